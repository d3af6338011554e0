//! Rate limits (PROTOCOL 7): a token bucket for each connection and one for
//! each bound device across all its connections. A request goes through
//! only if both have a token (and then takes one from each); otherwise the
//! device is told how long to wait, and nothing is stored. Pings are not
//! limited.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Tokens refill at the rate, up to the burst.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
    }

    /// How long until a token is there (zero: one is there now).
    fn wait(&self, rate: f64) -> Duration {
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / rate)
        }
    }
}

/// `limits.requests_per_sec` and `limits.burst`, and the devices' buckets.
pub struct RateLimits {
    rate: f64,
    burst: f64,
    devices: Mutex<Devices>,
}

#[derive(Default)]
struct Devices {
    buckets: HashMap<Arc<str>, Bucket>,
    /// Size after the last sweep: the next one comes at twice that.
    swept_at: usize,
}

impl RateLimits {
    /// `None` when off (`requests_per_sec` 0). A burst of 0 means one
    /// second's worth.
    pub fn new(requests_per_sec: u64, burst: u64) -> Option<RateLimits> {
        if requests_per_sec == 0 {
            return None;
        }
        let rate = requests_per_sec as f64;
        let burst = if burst == 0 { rate } else { burst as f64 };
        Some(RateLimits {
            rate,
            burst: burst.max(1.0),
            devices: Mutex::new(Devices::default()),
        })
    }

    /// A new connection's bucket, full.
    pub fn bucket(&self, now: Instant) -> Bucket {
        Bucket::full(self.burst, now)
    }

    fn devices(&self) -> MutexGuard<'_, Devices> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a token from the connection's bucket and, for a bound
    /// connection, the device's; `Err` is how long to wait.
    pub fn admit(
        &self,
        conn: &mut Bucket,
        device: Option<&Arc<str>>,
        now: Instant,
    ) -> Result<(), Duration> {
        conn.refill(self.rate, self.burst, now);
        let Some(device) = device else {
            return self.take(conn);
        };
        let mut devices = self.devices();
        let d = devices
            .buckets
            .entry(device.clone())
            .or_insert_with(|| Bucket::full(self.burst, now));
        d.refill(self.rate, self.burst, now);
        let wait = conn.wait(self.rate).max(d.wait(self.rate));
        if wait > Duration::ZERO {
            return Err(wait);
        }
        conn.tokens -= 1.0;
        d.tokens -= 1.0;
        self.sweep(&mut devices, now);
        Ok(())
    }

    fn take(&self, bucket: &mut Bucket) -> Result<(), Duration> {
        match bucket.wait(self.rate) {
            Duration::ZERO => {
                bucket.tokens -= 1.0;
                Ok(())
            }
            wait => Err(wait),
        }
    }

    /// Forgets devices whose bucket would be full again (idle long enough),
    /// whenever the table doubled since the last sweep: a device that
    /// comes back starts full anyway.
    fn sweep(&self, devices: &mut Devices, now: Instant) {
        if devices.buckets.len() < (2 * devices.swept_at).max(1024) {
            return;
        }
        let (rate, burst) = (self.rate, self.burst);
        devices.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens + elapsed * rate < burst
        });
        devices.swept_at = devices.buckets.len();
    }

    #[cfg(test)]
    fn devices_known(&self) -> usize {
        self.devices().buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_gets_its_burst_then_the_rate() {
        let limits = RateLimits::new(10, 3).unwrap();
        let t0 = Instant::now();
        let mut conn = limits.bucket(t0);
        for _ in 0..3 {
            assert_eq!(limits.admit(&mut conn, None, t0), Ok(()));
        }
        let wait = limits.admit(&mut conn, None, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert!(limits
            .admit(&mut conn, None, t0 + Duration::from_millis(99))
            .is_err());
        assert_eq!(
            limits.admit(&mut conn, None, t0 + Duration::from_millis(201)),
            Ok(())
        );
        assert!(RateLimits::new(0, 5).is_none(), "0 is off");
    }

    #[test]
    fn a_device_shares_one_bucket_across_its_connections() {
        let limits = RateLimits::new(1, 2).unwrap();
        let t0 = Instant::now();
        let device: Arc<str> = Arc::from("dev-1");
        let (mut a, mut b) = (limits.bucket(t0), limits.bucket(t0));
        assert_eq!(limits.admit(&mut a, Some(&device), t0), Ok(()));
        assert_eq!(limits.admit(&mut b, Some(&device), t0), Ok(()));
        // b's own bucket has a token left, the device's has none: refused,
        // and b's token is not taken.
        assert!(limits.admit(&mut b, Some(&device), t0).is_err());
        assert_eq!(limits.admit(&mut b, None, t0), Ok(()));
    }

    #[test]
    fn idle_devices_are_forgotten() {
        let limits = RateLimits::new(1000, 1).unwrap();
        let t0 = Instant::now();
        for i in 0..3000 {
            let d: Arc<str> = Arc::from(format!("d{i}"));
            let mut c = limits.bucket(t0);
            let now = t0 + Duration::from_millis(i);
            assert_eq!(limits.admit(&mut c, Some(&d), now), Ok(()));
        }
        assert!(limits.devices_known() < 2048, "{}", limits.devices_known());
    }
}
