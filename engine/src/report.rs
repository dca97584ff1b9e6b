//! Progress reporting: libraries report through [`Reporter`]; the binary
//! decides whether that becomes a progress bar (on a terminal) or nothing.

/// Receives progress of long work, in bytes.
pub trait Reporter: Send + Sync {
    fn start(&self, _stage: &str, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
    /// What a long wait is waiting for (an export in progress, say).
    fn status(&self, _message: &str) {}
}

/// Reports nothing.
pub struct Quiet;

impl Reporter for Quiet {}
