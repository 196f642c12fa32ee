//! How dead letters read back from a file become deliveries again: a decoder per event type
//! ever subscribed, and the upcasters users register for older versions.

use super::*;
use std::any::Any;

use crate::registry::Snapshot;
use crate::shard::decode_retry;

/// Rebuilds a dead letter's delivery from its JSON: see [`decode_retry`].
pub(crate) type Decoder = fn(&Snapshot, Envelope, &str, &str, &str) -> Result<Retry, String>;

/// How an event of type `E` written as an older version becomes today's `E` (user code).
pub(crate) type UpcastFn<E> =
    Arc<dyn Fn(serde_json::Value) -> Result<E, String> + Send + Sync + 'static>;

/// Rebuilds a dead letter of an older version through its upcaster: see `decode_retry`.
pub(crate) type UpcastRebuild =
    Arc<dyn Fn(&Snapshot, Envelope, &str, &str, &str) -> Result<Retry, String> + Send + Sync>;

/// A registered upcaster: typed (for the bridge's import) and for rebuilding dead letters.
pub(crate) struct Upcaster {
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    typed: Arc<dyn Any + Send + Sync>,
    rebuild: UpcastRebuild,
}

/// The decoders and upcasters of one bus.
#[derive(Default)]
pub(crate) struct Rebuilders {
    /// Every event type ever subscribed, by name and version.
    decoders: Mutex<std::collections::HashMap<(&'static str, u32), Decoder>>,
    /// Upcasters by (event name, the version they read).
    upcasters: Mutex<std::collections::HashMap<(&'static str, u32), Upcaster>>,
}

impl Rebuilders {
    /// Remembers how to decode today's version of `E`.
    pub(crate) fn add_decoder<E: Event>(&self) {
        self.decoders
            .lock()
            .insert((E::NAME, E::VERSION), decode_retry::<E>);
    }

    /// Registers how events of type `E` written as version `from` become today's `E`.
    pub(crate) fn add_upcaster<E: Event>(&self, from: u32, upcast: UpcastFn<E>) {
        let typed: Arc<dyn Any + Send + Sync> = Arc::new(upcast.clone());
        let rebuild: UpcastRebuild = Arc::new(
            move |snapshot: &Snapshot,
                  envelope: Envelope,
                  payload: &str,
                  handler: &str,
                  service: &str| {
                let value: serde_json::Value = serde_json::from_str(payload)
                    .map_err(|e| format!("the payload is not JSON: {e}"))?;
                let event = upcast(value).map_err(|e| {
                    format!("the payload does not upcast from {} v{from}: {e}", E::NAME)
                })?;
                crate::shard::retry_for::<E>(snapshot, envelope, event, handler, service)
            },
        );
        self.upcasters
            .lock()
            .insert((E::NAME, from), Upcaster { typed, rebuild });
    }

    /// How events of type `E` written as version `from` become today's `E`, if registered.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn upcaster<E: Event>(&self, from: u32) -> Option<UpcastFn<E>> {
        let typed = self.upcasters.lock().get(&(E::NAME, from))?.typed.clone();
        typed.downcast_ref::<UpcastFn<E>>().cloned()
    }

    /// Rebuilds a dead letter of event type `name` written as version `version` through its
    /// upcaster, if one is registered.
    pub(crate) fn upcast_rebuild(&self, name: &str, version: u32) -> Option<UpcastRebuild> {
        self.upcasters
            .lock()
            .iter()
            .find(|((n, v), _)| *n == name && *v == version)
            .map(|(_, u)| u.rebuild.clone())
    }

    /// The decoder of event type `name` version `version`, if it was ever subscribed.
    pub(crate) fn decoder(&self, name: &str, version: u32) -> Option<Decoder> {
        self.decoders
            .lock()
            .iter()
            .find(|((n, v), _)| *n == name && *v == version)
            .map(|(_, d)| *d)
    }

    /// Lets go of the upcasters (the bus has stopped), for the caller to drop: user code.
    pub(crate) fn forget(&self) -> Vec<Upcaster> {
        self.upcasters.lock().drain().map(|(_, u)| u).collect()
    }
}
