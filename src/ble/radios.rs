//! The hub's adapters: one transport and one link budget for each, and which adapter a lock
//! goes through.
//!
//! A hub may drive several Bluetooth adapters (the board's own and a USB one nearer the
//! door). Each is a controller of its own, with its own handful of links, so each has its own
//! [`ConnectionBudget`]. Every lock has a home adapter: the one that found it when it was
//! paired, or the least loaded one when the hub starts. A lock is reached through its home
//! first and through the others when that fails (the adapter unplugged or powered off, the lock
//! out of its range); whichever adapter reached it becomes its new home.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::budget::ConnectionBudget;
use super::{Advertisement, BleError, LockTransport};
use crate::protocol::ids::LockId;

/// Adapters one hub drives at most.
pub const MAX_RADIOS: usize = 4;

/// One adapter: its name, its transport and its budget.
#[derive(Debug)]
pub struct Radio<T> {
    name: String,
    transport: Arc<T>,
    budget: ConnectionBudget,
}

impl<T> Radio<T> {
    /// The adapter's name (`hci0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its transport.
    pub fn transport(&self) -> &Arc<T> {
        &self.transport
    }

    /// Its links.
    pub fn budget(&self) -> &ConnectionBudget {
        &self.budget
    }
}

/// The hub's adapters (at least one), shared by the gateway and every lock's client.
#[derive(Debug)]
pub struct Radios<T> {
    radios: Arc<[Radio<T>]>,
}

impl<T> Clone for Radios<T> {
    fn clone(&self) -> Self {
        Radios { radios: self.radios.clone() }
    }
}

impl<T> Radios<T> {
    /// The adapters `(name, transport)`, each allowed `max_links` links at once. There must be
    /// at least one, and at most [`MAX_RADIOS`].
    pub fn new(adapters: Vec<(String, Arc<T>)>, max_links: usize) -> Self {
        assert!((1..=MAX_RADIOS).contains(&adapters.len()), "1 to {MAX_RADIOS} adapters, not {}", adapters.len());
        let radios = adapters
            .into_iter()
            .map(|(name, transport)| Radio { name, transport, budget: ConnectionBudget::new(max_links) })
            .collect();
        Radios { radios }
    }

    /// One adapter with the given budget.
    pub fn single(name: impl Into<String>, transport: Arc<T>, budget: ConnectionBudget) -> Self {
        let radio = Radio { name: name.into(), transport, budget };
        Radios { radios: Arc::new([radio]) }
    }

    /// How many adapters there are.
    pub fn len(&self) -> usize {
        self.radios.len()
    }

    /// Never: there is always one adapter at least.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The adapter at `index` (`index < len()`).
    pub fn get(&self, index: usize) -> &Radio<T> {
        &self.radios[index]
    }

    /// Every adapter, in the configured order.
    pub fn iter(&self) -> impl Iterator<Item = &Radio<T>> {
        self.radios.iter()
    }

    /// The adapter home to the fewest locks, given each lock's home (the first in the
    /// configured order on a tie): where a lock with no home yet settles.
    pub fn least_loaded(&self, homes: impl IntoIterator<Item = usize>) -> usize {
        let counts = self.count_homes(homes);
        (0..counts.len()).min_by_key(|&i| counts[i]).expect("at least one adapter")
    }

    /// How many of `homes` (each lock's home) each adapter is home to, in the configured order.
    pub fn count_homes(&self, homes: impl IntoIterator<Item = usize>) -> Vec<usize> {
        let mut counts = vec![0usize; self.radios.len()];
        for home in homes {
            counts[home] += 1;
        }
        counts
    }

    /// The order in which a lock at home on `home` is tried: its home, then the others.
    pub fn order_from(&self, home: usize) -> impl Iterator<Item = usize> + use<T> {
        let n = self.radios.len();
        (0..n).map(move |i| (home + i) % n)
    }
}

impl<T: LockTransport> Radios<T> {
    /// Looks for the lock `lock_id` through every adapter at once, at most `timeout`; returns
    /// the first adapter to see it and the advertisement it heard. When none does, the first
    /// adapter's error (its own, when it is the only one).
    pub async fn locate(&self, lock_id: LockId, timeout: Duration) -> Result<(usize, Advertisement), BleError> {
        let mut searches: FuturesUnordered<_> = self
            .radios
            .iter()
            .enumerate()
            .map(|(i, radio)| async move { (i, radio.transport.locate(lock_id, timeout).await) })
            .collect();
        let mut errors: Vec<Option<BleError>> = vec![None; self.radios.len()];
        while let Some((i, found)) = searches.next().await {
            match found {
                Ok(ad) => return Ok((i, ad)),
                Err(e) => errors[i] = Some(e),
            }
        }
        Err(errors.into_iter().flatten().next().expect("every adapter answered"))
    }

    /// Scans through every adapter at once for `duration`; every LHP/1 lock heard, once (as
    /// the adapter that heard it strongest did), strongest first. Fails only if every adapter
    /// does.
    pub async fn scan(&self, duration: Duration) -> Result<Vec<Advertisement>, BleError> {
        let scans = futures::future::join_all(self.radios.iter().map(|r| r.transport.scan(duration))).await;
        let mut heard: std::collections::BTreeMap<String, Advertisement> = std::collections::BTreeMap::new();
        let mut first_error = None;
        let mut any = false;
        for scan in scans {
            match scan {
                Ok(ads) => {
                    any = true;
                    for ad in ads {
                        match heard.get(&ad.address) {
                            Some(known) if known.rssi >= ad.rssi => {}
                            _ => {
                                heard.insert(ad.address.clone(), ad);
                            }
                        }
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if !any && let Some(e) = first_error {
            return Err(e);
        }
        let mut found: Vec<Advertisement> = heard.into_values().collect();
        Advertisement::sort_strongest_first(&mut found);
        Ok(found)
    }

    /// Every adapter's transport forgets the lock at `address` (see [`LockTransport::forget`]).
    pub fn forget(&self, address: &str) {
        for radio in self.radios.iter() {
            radio.transport.forget(address);
        }
    }

    /// Whether any adapter's transport keeps anything about the lock at `address`.
    pub fn remembers(&self, address: &str) -> bool {
        self.radios.iter().any(|r| r.transport.remembers(address))
    }
}

/// Whether `text` names an adapter as the configuration may: `hci` and its index, or its
/// address (six hexadecimal pairs separated by colons).
pub fn is_adapter_selector(text: &str) -> bool {
    let is_name =
        text.strip_prefix("hci").is_some_and(|n| (1..=3).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()));
    is_name || is_address(text)
}

/// Whether `text` is a Bluetooth address (`00:1A:7D:DA:71:13`, either case).
pub fn is_address(text: &str) -> bool {
    text.len() == 17 && text.split(':').all(|pair| pair.len() == 2 && pair.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapters_are_named_by_index_or_address() {
        for good in ["hci0", "hci12", "00:1A:7D:DA:71:13", "00:1a:7d:da:71:13"] {
            assert!(is_adapter_selector(good), "{good}");
        }
        for bad in ["", "hci", "hci1234", "hcix", "eth0", "00:1A:7D:DA:71", "00:1A:7D:DA:71:1G", "00-1A-7D-DA-71-13"] {
            assert!(!is_adapter_selector(bad), "{bad}");
        }
    }

    fn three() -> Radios<()> {
        Radios::new(
            vec![("hci0".into(), Arc::new(())), ("hci1".into(), Arc::new(())), ("hci2".into(), Arc::new(()))],
            2,
        )
    }

    #[test]
    fn locks_settle_on_the_least_loaded_adapter() {
        let radios = three();
        let mut homes = Vec::new();
        for _ in 0..6 {
            homes.push(radios.least_loaded(homes.clone()));
        }
        assert_eq!(homes, [0, 1, 2, 0, 1, 2], "spread evenly, in the configured order");
        homes[2] = 0;
        assert_eq!(radios.count_homes(homes.clone()), [3, 2, 1]);
        assert_eq!(radios.least_loaded(homes), 2);
        assert!(radios.iter().all(|r| r.budget().in_use() == 0), "each adapter has its own budget");
    }

    #[test]
    fn a_lock_is_tried_through_its_home_first_then_the_others_in_turn() {
        let radios = three();
        assert_eq!(radios.order_from(0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(radios.order_from(2).collect::<Vec<_>>(), [2, 0, 1]);
        let one = Radios::single("hci0", Arc::new(()), ConnectionBudget::new(1));
        assert_eq!(one.order_from(0).collect::<Vec<_>>(), [0]);
    }
}
