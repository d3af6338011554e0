//! Brute-force damping by source address (PROTOCOL 5): an address with
//! [`DAMP_FAILURES`] failed authentications within [`DAMP_WINDOW`] has its
//! new connections closed for [`DAMP_WINDOW`].
//!
//! The table is bounded ([`DAMP_MAX_ADDRESSES`]) and every event costs
//! O(1): entries are kept in the order they were created, and when the
//! table is full the oldest goes, so a flood of new addresses can never
//! stop new addresses from being damped (the price: it can push out an
//! older address's count, which then starts again). IPv6 addresses are
//! counted by their /64: one host usually owns a whole /64.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::ops::logging::escaped;
use crate::ops::metrics::Metrics;

pub const DAMP_FAILURES: usize = 5;
pub const DAMP_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most (about 100 bytes each).
pub const DAMP_MAX_ADDRESSES: usize = 100_000;

/// What one record is kept for: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let o = v6.octets();
                    Source::V6Prefix(o[..8].try_into().expect("8 bytes"))
                }
            },
        }
    }
}

pub struct Damper {
    metrics: Arc<Metrics>,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    records: HashMap<Source, Record>,
    /// Creation order of the records, with the generation each was created
    /// in: an entry whose record was replaced since is skipped.
    order: VecDeque<(Source, u64)>,
    next: u64,
}

struct Record {
    generation: u64,
    /// Times of recent failures, oldest first, fewer than `DAMP_FAILURES`.
    failures: VecDeque<Instant>,
    closed_until: Option<Instant>,
}

impl Damper {
    pub fn new(metrics: Arc<Metrics>) -> Damper {
        Damper {
            metrics,
            table: Mutex::new(Table::default()),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when connections from `ip` are to be closed at once.
    pub fn is_damped(&self, ip: IpAddr) -> bool {
        let damped = self
            .table()
            .records
            .get(&Source::from(ip))
            .and_then(|r| r.closed_until)
            .is_some_and(|t| t > Instant::now());
        if damped {
            self.metrics.auth_damped.fetch_add(1, Relaxed);
        }
        damped
    }

    /// Counts one failed authentication from `ip`.
    pub fn failure(&self, ip: IpAddr) {
        let now = Instant::now();
        let source = Source::from(ip);
        let mut guard = self.table();
        let t = &mut *guard;
        if !t.records.contains_key(&source) {
            while t.records.len() >= DAMP_MAX_ADDRESSES {
                let Some((old, generation)) = t.order.pop_front() else {
                    break;
                };
                if t.records
                    .get(&old)
                    .is_some_and(|r| r.generation == generation)
                {
                    t.records.remove(&old);
                }
            }
            let generation = t.next;
            t.next += 1;
            t.order.push_back((source, generation));
            t.records.insert(
                source,
                Record {
                    generation,
                    failures: VecDeque::with_capacity(DAMP_FAILURES),
                    closed_until: None,
                },
            );
            // Entries of records already gone: keep the queue near the table.
            while t.order.len() > 2 * DAMP_MAX_ADDRESSES {
                if let Some((old, generation)) = t.order.pop_front() {
                    if t.records
                        .get(&old)
                        .is_some_and(|r| r.generation == generation)
                    {
                        t.order.push_back((old, generation));
                    }
                }
            }
        }
        let record = t.records.get_mut(&source).expect("inserted above");
        while record
            .failures
            .front()
            .is_some_and(|at| now.duration_since(*at) >= DAMP_WINDOW)
        {
            record.failures.pop_front();
        }
        record.failures.push_back(now);
        if record.failures.len() >= DAMP_FAILURES {
            record.failures.clear();
            record.closed_until = Some(now + DAMP_WINDOW);
            log::warn!(
                "{DAMP_FAILURES} failed authentications from {} within {}s: closing its connections for {}s",
                escaped(&ip.to_string()),
                DAMP_WINDOW.as_secs(),
                DAMP_WINDOW.as_secs()
            );
        }
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.table().records.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn damper() -> Damper {
        Damper::new(Arc::new(Metrics::default()))
    }

    #[test]
    fn five_failures_in_the_window_damp_that_address_only() {
        let d = damper();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..DAMP_FAILURES - 1 {
            d.failure(a);
        }
        assert!(!d.is_damped(a));
        d.failure(a);
        assert!(d.is_damped(a));
        assert!(!d.is_damped(b));
        assert_eq!(d.metrics.auth_damped.load(Relaxed), 1);
    }

    #[test]
    fn a_full_table_still_damps_new_addresses() {
        let d = damper();
        for i in 0..(DAMP_MAX_ADDRESSES as u32 + 10) {
            d.failure(IpAddr::from((0x0a00_0000 + i).to_be_bytes()));
        }
        assert_eq!(d.remembered(), DAMP_MAX_ADDRESSES);
        let late: IpAddr = "192.168.7.7".parse().unwrap();
        for _ in 0..DAMP_FAILURES {
            d.failure(late);
        }
        assert!(d.is_damped(late));
        assert_eq!(d.remembered(), DAMP_MAX_ADDRESSES);
        assert!(d.table().order.len() <= 2 * DAMP_MAX_ADDRESSES);
    }

    #[test]
    fn ipv6_is_damped_by_its_64() {
        let d = damper();
        for i in 0..DAMP_FAILURES {
            d.failure(format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap());
        }
        assert!(d.is_damped("2001:db8:1:2:ffff::1".parse().unwrap()));
        assert!(!d.is_damped("2001:db8:1:3::1".parse().unwrap()));
        // An IPv4 address mapped into IPv6 is the IPv4 address.
        for _ in 0..DAMP_FAILURES {
            d.failure("::ffff:10.1.1.1".parse().unwrap());
        }
        assert!(d.is_damped("10.1.1.1".parse().unwrap()));
    }
}
