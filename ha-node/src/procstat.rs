//! This process's resident memory, threads and open files, from `/proc/self`
//! (Linux). Unreadable fields read as 0 rather than failing a scrape.

/// A reading of `/proc/self`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStat {
    /// Resident memory (`VmRSS`).
    pub rss_bytes: u64,
    /// Threads (`Threads`).
    pub threads: u64,
    /// Entries of `/proc/self/fd`.
    pub open_fds: u64,
}

/// Reads `/proc/self` now.
pub fn read() -> ProcStat {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    ProcStat {
        rss_bytes: field("VmRSS:") * 1024,
        threads: field("Threads:"),
        open_fds,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_memory_threads_and_files() {
        let p = super::read();
        assert!(
            p.rss_bytes > 0 && p.threads >= 1 && p.open_fds >= 1,
            "{p:?}"
        );
    }
}
