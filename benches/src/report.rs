//! `edgegate-bench report`: turns the result lines of `benches/run.sh` (and
//! `benches/profile.sh`, if present) into BENCHMARKS.md, so that every figure
//! in it comes from the run that wrote it.

use std::fmt::Write as _;

use crate::plot::{parse_line, Fields};

fn get(f: &Fields, key: &str) -> Option<f64> {
    f.get(key)?.parse().ok()
}

fn text<'a>(f: &'a Fields, key: &str) -> &'a str {
    f.get(key).map_or("?", String::as_str)
}

fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The gateway's RSS (KiB) at the first sample of a replay's curve, when it
/// was ready with the backlog loaded.
fn rss_at_ready(f: &Fields) -> f64 {
    f.get("curve")
        .and_then(|c| c.split(',').next()?.rsplit(':').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

/// The Markdown report for `results` (run.sh) and `profile` (profile.sh).
pub fn markdown(results: &str, profile: Option<&str>) -> String {
    let lines: Vec<Fields> = results.lines().filter_map(parse_line).collect();
    let find = |phase: Option<&str>, mode: &str| -> Vec<&Fields> {
        lines
            .iter()
            .filter(|f| {
                f["mode"] == mode
                    && phase.is_none_or(|p| f.get("phase").map(String::as_str) == Some(p))
            })
            .collect()
    };
    let mut md = String::new();
    let w = &mut md;
    let machine = find(None, "machine");
    let _ = writeln!(w, "# Benchmarks\n");
    if let Some(m) = machine.first() {
        let _ = writeln!(
            w,
            "Measured on {} ({} cores, {}), {}. The broker ([tansu](https://crates.io/crates/tansu) 0.6.0, memory storage), the gateway and the load all ran on this one machine, sharing its cores; absolute numbers drift with what else runs, ratios measured side by side hold better.\n",
            text(m, "cpu").replace('_', " "),
            text(m, "cores"),
            text(m, "arch"),
            text(m, "date"),
        );
    }
    let _ = writeln!(
        w,
        "Rerun everything with `benches/run.sh` (about 10 minutes; it builds the release binary, starts its own broker and gateways, and rewrites this file, `benches/results.txt` and `benches/results.svg`). Instruction counts: `benches/profile.sh`.\n"
    );
    let _ = writeln!(
        w,
        "![throughput, latency and replay](benches/results.svg)\n"
    );

    // ---- uplink against raw, alternating ----
    let raws = find(Some("ratio"), "raw");
    let ups = find(Some("ratio"), "uplink");
    let mut ratios = Vec::new();
    let _ = writeln!(w, "## Uplink against the raw producer\n");
    let _ = writeln!(
        w,
        "Each round runs `edgegate-bench raw` (librdkafka straight to the broker: idempotent, acks=all, linger 5 ms, 200-byte values, 400,000 messages) and then `edgegate bench uplink` (50 connections, each pipelining 64 frames of 200 bytes; an ack is sent only after the request is in the outbox on disk; every acked messageId is then looked up in the topic). CPU seconds are those each process used during the uplink run.\n"
    );
    let _ = writeln!(
        w,
        "| round | raw msgs/s | uplink msgs/s | ratio | ack p50 / p99 / p999 ms | verified | CPU s: gateway / broker / load |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    for (i, (raw, up)) in raws.iter().zip(&ups).enumerate() {
        let (r, u) = (
            get(raw, "msgs_per_sec").unwrap_or(0.0),
            get(up, "msgs_per_sec").unwrap_or(0.0),
        );
        let ratio = u / r.max(1.0);
        ratios.push(ratio);
        let _ = writeln!(
            w,
            "| {} | {} | {} | {:.0}% | {} / {} / {} | {} of {} | {} / {} / {} |",
            i + 1,
            thousands(r),
            thousands(u),
            ratio * 100.0,
            text(up, "p50_ms"),
            text(up, "p99_ms"),
            text(up, "p999_ms"),
            text(up, "verified"),
            text(up, "acked"),
            text(up, "gateway_cpu_secs"),
            text(up, "broker_cpu_secs"),
            text(up, "client_cpu_secs"),
        );
    }
    let ratio = mean(&ratios);
    if let Some(up) = ups.first() {
        let secs: f64 = ups.iter().filter_map(|f| get(f, "seconds")).sum();
        let cpu = |k: &str| ups.iter().filter_map(|f| get(f, k)).sum::<f64>();
        let cores = machine.first().and_then(|m| get(m, "cores")).unwrap_or(2.0);
        let _ = writeln!(
            w,
            "\nMean ratio {:.0}%. Of the machine's {} cores × {:.1} s of uplink runs, the gateway used {:.0}%, the broker {:.0}%, the load client {:.0}%.\n",
            ratio * 100.0,
            cores,
            secs,
            cpu("gateway_cpu_secs") / (secs * cores) * 100.0,
            cpu("broker_cpu_secs") / (secs * cores) * 100.0,
            cpu("client_cpu_secs") / (secs * cores) * 100.0,
        );
        let _ = up;
    }

    if let Some(f) = find(Some("musl"), "uplink").first() {
        let _ = writeln!(
            w,
            "The static musl binary that the .deb ships (musl's allocator instead of glibc's), same run, one round: {} msgs/s, ack p99 {} ms ({:.0}% of the mean raw rate).\n",
            thousands(get(f, "msgs_per_sec").unwrap_or(0.0)),
            text(f, "p99_ms"),
            get(f, "msgs_per_sec").unwrap_or(0.0)
                / mean(&raws.iter().filter_map(|r| get(r, "msgs_per_sec")).collect::<Vec<_>>()).max(1.0)
                * 100.0
        );
    }

    // ---- sweep ----
    let sweep = find(Some("sweep"), "uplink");
    if !sweep.is_empty() {
        let _ = writeln!(w, "## Uplink by number of connections\n\n200,000 messages of 200 bytes, window 64 per connection, durable acks.\n\n| connections | msgs/s | ack p50 ms | p99 ms | p999 ms | verified |\n| --- | --- | --- | --- | --- | --- |");
        for f in &sweep {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} of {} |",
                text(f, "connections"),
                thousands(get(f, "msgs_per_sec").unwrap_or(0.0)),
                text(f, "p50_ms"),
                text(f, "p99_ms"),
                text(f, "p999_ms"),
                text(f, "verified"),
                text(f, "acked")
            );
        }
        let _ = writeln!(w);
    }

    // ---- round trip ----
    let rt = find(None, "roundtrip");
    if let Some(f) = rt.first() {
        let _ = writeln!(
            w,
            "## Round trip\n\nDevice → gateway → Kafka → an echo worker (in the bench process: reads the uplink topic, answers each request by clientId) → Kafka → gateway → device, {} connections at {} msgs/s in all for {} s: {} sent, {} echoed, {} lost. Latency from send to echo: p50 {} ms, p99 {} ms, p999 {} ms.\n",
            text(f, "connections"),
            text(f, "rate"),
            text(f, "seconds"),
            text(f, "sent"),
            text(f, "echoed"),
            text(f, "lost"),
            text(f, "p50_ms"),
            text(f, "p99_ms"),
            text(f, "p999_ms"),
        );
    }

    if let (Some(f), Some(h)) = (rt.first(), find(None, "hop").first()) {
        let _ = writeln!(
            w,
            "Where the time goes: the way up (device to worker) took p50 {} / p99 {} ms, the way down (worker to device) p50 {} / p99 {} ms. One hop through the broker alone (`edgegate bench hop`: a producer with 1 ms linger to a consumer polling like the worker, {} msgs/s, no gateway) takes p50 {} / p99 {} ms here, and a round trip crosses the broker twice.\n",
            text(f, "up_p50_ms"),
            text(f, "up_p99_ms"),
            text(f, "down_p50_ms"),
            text(f, "down_p99_ms"),
            text(h, "rate"),
            text(h, "p50_ms"),
            text(h, "p99_ms"),
        );
    }

    // ---- idle, replay, footprint ----
    let idle = find(None, "idle");
    if let Some(f) = idle.first() {
        let _ = writeln!(
            w,
            "## Idle connections\n\n{} idle connections to a fresh gateway: RSS {} KiB before, {} KiB after: **{} bytes per connection**.\n",
            text(f, "connections"),
            text(f, "rss_before_kib"),
            text(f, "rss_after_kib"),
            text(f, "bytes_per_connection"),
        );
    }
    let replay = find(None, "drain");
    let replay_raw = find(Some("replay-raw"), "raw");
    let mut replay_ratio = None;
    if let Some(f) = replay.first() {
        let rate = get(f, "msgs_per_sec").unwrap_or(0.0);
        let raw = replay_raw.first().and_then(|r| get(r, "msgs_per_sec"));
        replay_ratio = raw.map(|r| rate / r);
        let curve: Vec<f64> = f
            .get("curve")
            .map(|c| {
                c.split(',')
                    .filter_map(|s| s.rsplit(':').next()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let (first, last) = (
            curve.first().copied().unwrap_or(0.0),
            curve.last().copied().unwrap_or(0.0),
        );
        let _ = writeln!(
            w,
            "## Replay\n\nA backlog of {} requests was built with the broker unreachable (50 connections, acked into the outbox), the gateway stopped, and a new one started against the broker. It was ready {} ms after start; from then the outbox drained in {} s: **{} msgs/s**{}. RSS: {} MiB when ready, peak {} MiB, {} MiB at the end (curve in the plot).\n",
            thousands(get(f, "records").unwrap_or(0.0)),
            text(f, "ready_ms"),
            text(f, "seconds"),
            thousands(rate),
            match raw {
                Some(r) => format!(", against {} msgs/s for the raw producer sending the same number in the same session ({:.0}%)", thousands(r), rate / r * 100.0),
                None => String::new(),
            },
            (first / 1024.0).round(),
            (get(f, "peak_rss_kib").unwrap_or(0.0) / 1024.0).round(),
            (last / 1024.0).round(),
        );
    }
    if let Some(f) = find(Some("musl"), "drain").first() {
        let curve_first = rss_at_ready(f);
        let _ = writeln!(
            w,
            "The same backlog drained by the static musl build the .deb ships: {} s, {} msgs/s; RSS {} MiB when ready, peak {} MiB.\n",
            text(f, "seconds"),
            thousands(get(f, "msgs_per_sec").unwrap_or(0.0)),
            (curve_first / 1024.0).round(),
            (get(f, "peak_rss_kib").unwrap_or(0.0) / 1024.0).round(),
        );
    }
    let foot = find(None, "footprint");
    if let Some(f) = foot.first() {
        let _ = writeln!(
            w,
            "## Footprint\n\n- Release binary built here (x86_64, glibc, dynamically linked, stripped): {} bytes.",
            thousands(get(f, "binary_bytes").unwrap_or(0.0))
        );
        for (key, name) in [
            ("static_aarch64_bytes", "aarch64 musl, static"),
            ("static_armv7_bytes", "armv7 musl, static"),
            ("static_x86_64_bytes", "x86_64 musl, static"),
        ] {
            if let Some(v) = get(f, key) {
                let _ = writeln!(
                    w,
                    "- {name} (cross/build.sh, the .deb's binary): {} bytes.",
                    thousands(v)
                );
            }
        }
        let _ = writeln!(
            w,
            "- RSS of an idle gateway connected to Kafka: {} KiB.\n- Start to ready (`/readyz` 200, polled every 25 ms) over 5 starts: median {} ms (all: {}).\n",
            text(f, "idle_rss_kib"),
            text(f, "ready_ms_median"),
            text(f, "ready_ms_all"),
        );
    }

    // ---- targets ----
    let _ = writeln!(
        w,
        "## Targets\n\n| target | result | |\n| --- | --- | --- |"
    );
    if !ratios.is_empty() {
        let _ = writeln!(w, "| uplink ≥ 60% of raw (50 connections, durable acks) | {:.0}% (mean of {} rounds) | {} |", ratio * 100.0, ratios.len(), verdict(ratio >= 0.6));
    }
    if let Some(f) = rt.first() {
        let p99 = get(f, "p99_ms").unwrap_or(f64::MAX);
        let _ = writeln!(
            w,
            "| round trip p99 < 20 ms at 5,000 msgs/s | {p99:.1} ms | {} |",
            verdict(p99 < 20.0)
        );
    }
    if let Some(f) = idle.first() {
        let b = get(f, "bytes_per_connection").unwrap_or(f64::MAX);
        let _ = writeln!(
            w,
            "| idle connection ≤ 2 KiB RSS at 10,000 | {b:.0} bytes | {} |",
            verdict(b <= 2048.0)
        );
    }
    if let (Some(r), Some(f)) = (replay_ratio, replay.first()) {
        // "Flat": the peak during the drain within a quarter of the RSS the
        // gateway had when it was ready (with the backlog loaded).
        let at_ready = rss_at_ready(f);
        let peak = get(f, "peak_rss_kib").unwrap_or(0.0);
        let flat = at_ready > 0.0 && peak <= at_ready * 1.25;
        let _ = writeln!(
            w,
            "| replay ≥ 50% of raw | {:.0}% of raw | {} |\n| replay with flat RSS | {} MiB when ready, peak {} MiB | {} |",
            r * 100.0,
            verdict(r >= 0.5),
            (at_ready / 1024.0).round(),
            (peak / 1024.0).round(),
            verdict(flat)
        );
    }
    if let Some(f) = foot.first() {
        let _ = writeln!(
            w,
            "| static binary size, idle RSS, start to ready | {} bytes (aarch64), {} KiB, {} ms | reported |",
            text(f, "static_aarch64_bytes"),
            text(f, "idle_rss_kib"),
            text(f, "ready_ms_median")
        );
    }
    let _ = writeln!(w);

    if let Some(profile) = profile {
        if let Some(p) = &profile.lines().find_map(parse_line) {
            let _ = writeln!(
                w,
                "## Instruction counts (callgrind)\n\nFrom `benches/profile.sh`: the gateway run under callgrind for {} and for {} messages from 10 connections; the difference over the extra messages is what one message costs the gateway, librdkafka included, without start-up and shutdown. The raw producer measured the same way. Instruction counts do not depend on how busy the machine is.\n\n- gateway: **{} instructions per message**\n- raw librdkafka producer: {} instructions per message\n",
                text(p, "n1"),
                text(p, "n2"),
                thousands(get(p, "gateway_instructions_per_message").unwrap_or(0.0)),
                thousands(get(p, "raw_instructions_per_message").unwrap_or(0.0)),
            );
            let top: Vec<&str> = profile
                .lines()
                .filter_map(|l| l.strip_prefix("# "))
                .collect();
            if !top.is_empty() {
                let _ = writeln!(w, "```\n{}\n```\n", top.join("\n"));
            }
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_holds_every_figure_and_judges_targets() {
        let results = "\
mode=machine cores=2 arch=x86_64 cpu=Test_CPU date=2026-11-26T00:00Z
phase=ratio mode=raw messages=400000 size=200 seconds=1 msgs_per_sec=500000
phase=ratio mode=uplink connections=50 window=64 size=200 acked=400000 errors=0 seconds=1.5 msgs_per_sec=320000 p50_ms=9 p99_ms=18 p999_ms=25 client_cpu_secs=0.5 verified=400000 missing=0 gateway_cpu_secs=1.2 broker_cpu_secs=0.9
phase=sweep mode=uplink connections=10 window=64 size=200 acked=200000 errors=0 seconds=1 msgs_per_sec=250000 p50_ms=3 p99_ms=6 p999_ms=7 client_cpu_secs=0.3 verified=200000 missing=0
mode=roundtrip connections=50 rate=5000 seconds=10 sent=50000 echoed=50000 lost=0 p50_ms=12 p99_ms=25.5 p999_ms=30
mode=footprint binary_bytes=9000000 idle_rss_kib=9000 ready_ms_median=40 ready_ms_all=40,41,39,40,42 static_aarch64_bytes=8000000
mode=idle connections=10000 rss_before_kib=9000 rss_after_kib=25000 bytes_per_connection=1638
mode=drain records=1000000 seconds=4 msgs_per_sec=250000 peak_rss_kib=80000 curve=0.00:1000000:40000,4.00:0:80000 ready_ms=120
phase=replay-raw mode=raw messages=1000000 size=200 seconds=2 msgs_per_sec=450000
";
        let md = markdown(results, Some("mode=profile n1=1 n2=3 gateway_instructions_per_message=12000 raw_instructions_per_message=4000\n# top line\n"));
        for want in [
            "Test CPU",
            "| 1 | 500,000 | 320,000 | 64% |",
            "Mean ratio 64%",
            "| 10 | 250,000 |",
            "p99 25.5 ms",
            "1638 bytes per connection",
            "250,000 msgs/s",
            "(56%)",
            "12,000 instructions per message",
            "| round trip p99 < 20 ms at 5,000 msgs/s | 25.5 ms | **missed** |",
            "| uplink ≥ 60% of raw (50 connections, durable acks) | 64% (mean of 1 rounds) | met |",
            "top line",
        ] {
            assert!(md.contains(want), "missing {want:?} in:\n{md}");
        }
    }
}
