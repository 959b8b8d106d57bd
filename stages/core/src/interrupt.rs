//! Whether the user asked the run to stop (Ctrl-C). The engine records the request; a
//! long-running job polls [`requested`] at safe points, saves what a rerun needs to resume
//! (the train stage writes a checkpoint), and returns an error. The flag is process-wide
//! because the signal is.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Records a stop request; returns whether one had already been made (a second Ctrl-C).
pub fn request() -> bool {
    REQUESTED.swap(true, Ordering::SeqCst)
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
