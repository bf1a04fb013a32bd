//! The default size of the prefix cache's host tier (`--host-cache-gb`): off on the CPU, where
//! the device cache is host memory already; on a GPU, min(16 GiB, a quarter of the memory this
//! process may use).
//!
//! Why those numbers: the tier is page-locked, so it can neither be swapped nor reclaimed for the
//! page cache, and it shares the host with what the router maps and buffers (the checkpoint is
//! memory-mapped while it loads) and, usually, with expert shards. A quarter leaves them the rest.
//! 16 GiB holds about 240,000 tokens of DeepSeek-V2's latent cache (60 layers × 576 × 2 B ≈ 69 KB
//! a token), over a hundred 2K-token prefixes, which covers the shared system prompts and
//! few-shot headers the tier is for; more is a flag away. Slots are pinned as the tier fills,
//! so an idle tier costs nothing.

use dsv2_core::backend::DeviceSpec;

pub const GIB: u64 = 1 << 30;
/// The GPU default's upper bound.
pub const DEFAULT_MAX_BYTES: u64 = 16 * GIB;

/// `--host-cache-gb` when it is not given.
pub fn default_host_cache_bytes(device: DeviceSpec) -> u64 {
    match device {
        DeviceSpec::Cpu => 0,
        DeviceSpec::Cuda(_) => usable_memory_bytes().map_or(0, |m| (m / 4).min(DEFAULT_MAX_BYTES)),
    }
}

/// GiB (fractions allowed) as bytes: finite and not negative.
pub fn parse_gib(s: &str) -> Result<u64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{v}: expected a size in GiB, 0 or more"));
    }
    let bytes = v * GIB as f64;
    if bytes >= u64::MAX as f64 {
        return Err(format!("{v} GiB is more than this machine can address"));
    }
    Ok(bytes as u64)
}

/// The memory this process may use: the machine's, or its cgroup's limit when lower (a
/// container sees the host's /proc/meminfo). None when neither can be read.
pub fn usable_memory_bytes() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let total = read("/proc/meminfo").and_then(|t| mem_total(&t));
    let limit = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|t| cgroup_limit(&t));
    match (total, limit) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    }
}

/// `MemTotal` of /proc/meminfo, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// A cgroup memory limit in bytes; None for none ("max", or v1's near-u64::MAX "unlimited").
fn cgroup_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    (v < 1 << 60).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_cgroup_limits_are_read() {
        let meminfo = "MemTotal:       263842352 kB\nMemFree:        1000 kB\n";
        assert_eq!(mem_total(meminfo), Some(263_842_352 * 1024));
        assert_eq!(mem_total("MemFree: 5 kB\n"), None);
        assert_eq!(cgroup_limit("max\n"), None);
        assert_eq!(cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(cgroup_limit("8589934592\n"), Some(8 * GIB));
    }

    #[test]
    fn the_default_is_off_on_the_cpu_and_bounded_on_a_gpu() {
        assert_eq!(default_host_cache_bytes(DeviceSpec::Cpu), 0);
        let gpu = default_host_cache_bytes(DeviceSpec::Cuda(0));
        assert!(gpu <= DEFAULT_MAX_BYTES);
        if let Some(m) = usable_memory_bytes() {
            assert_eq!(gpu, (m / 4).min(DEFAULT_MAX_BYTES));
        }
    }

    #[test]
    fn sizes_parse_as_gib() {
        assert_eq!(parse_gib("0"), Ok(0));
        assert_eq!(parse_gib("1.5"), Ok(3 * GIB / 2));
        assert!(parse_gib("-1").is_err());
        assert!(parse_gib("inf").is_err());
        assert!(parse_gib("NaN").is_err());
        assert!(parse_gib("lots").is_err());
    }
}
