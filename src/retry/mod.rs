//! Offering deliveries again later: the timing wheel and the timer thread that drives it.

pub(crate) mod timer;
pub(crate) mod wheel;
