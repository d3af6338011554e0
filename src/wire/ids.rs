//! Connection and message ids: UUID v4 whose random bits come from the
//! kernel's generator, fetched 4 KiB at a time per thread. `Uuid::new_v4`
//! makes one getrandom call per id, which a profile of the uplink path put
//! at 6% of the gateway's CPU.

use std::cell::RefCell;

use uuid::Uuid;

const POOL_BYTES: usize = 4096;

struct Pool {
    bytes: Box<[u8; POOL_BYTES]>,
    /// Bytes already handed out.
    used: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool {
        bytes: Box::new([0; POOL_BYTES]),
        used: POOL_BYTES,
    });
}

/// A new random (version 4) UUID.
pub fn new_v4() -> Uuid {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.used + 16 > POOL_BYTES {
            if !refill(&mut pool.bytes[..]) {
                return Uuid::new_v4();
            }
            pool.used = 0;
        }
        let at = pool.used;
        let mut random = [0u8; 16];
        random.copy_from_slice(&pool.bytes[at..at + 16]);
        // Handed-out bytes are not kept around.
        pool.bytes[at..at + 16].fill(0);
        pool.used += 16;
        uuid::Builder::from_random_bytes(random).into_uuid()
    })
}

fn refill(buf: &mut [u8]) -> bool {
    use rustix::rand::{getrandom, GetRandomFlags};
    let mut filled = 0;
    while filled < buf.len() {
        match getrandom(&mut buf[filled..], GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_version_4_and_distinct_across_refills() {
        let ids: Vec<Uuid> = (0..10 * POOL_BYTES / 16).map(|_| new_v4()).collect();
        assert!(ids.iter().all(|id| id.get_version_num() == 4));
        assert!(ids
            .iter()
            .all(|id| id.get_variant() == uuid::Variant::RFC4122));
        let distinct: HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // Other threads draw from pools of their own.
        let other = std::thread::spawn(|| (0..300).map(|_| new_v4()).collect::<Vec<_>>())
            .join()
            .unwrap();
        assert!(other.iter().all(|id| !distinct.contains(id)));
    }
}
