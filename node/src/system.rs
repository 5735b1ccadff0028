//! What the machine offers: its memory, and how much of it a node may use.

/// Memory left to the operating system and other programs when the user sets no limit:
/// a tenth of the machine, and never less than this.
const MIN_OS_RESERVE: u64 = 4 << 30;

/// Memory this node offers for model layers and KV caches when `--memory-limit` is not
/// given: physical memory less an OS reserve.
pub fn default_usable_memory() -> u64 {
    let total = total_memory().unwrap_or(8 << 30);
    let reserve = (total / 10).max(MIN_OS_RESERVE).min(total / 2);
    total - reserve
}

/// Physical memory, in bytes.
pub fn total_memory() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
    #[cfg(target_os = "macos")]
    {
        let mut bytes: u64 = 0;
        let mut size = std::mem::size_of::<u64>();
        // SAFETY: sysctlbyname writes at most `size` bytes into `bytes`.
        let status = unsafe {
            libc::sysctlbyname(
                c"hw.memsize".as_ptr(),
                (&mut bytes as *mut u64).cast(),
                &mut size,
                std::ptr::null_mut(),
                0,
            )
        };
        (status == 0).then_some(bytes)
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        None
    }
}
