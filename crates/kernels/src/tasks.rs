//! How a pass over a tensor is cut into rayon tasks: the same cut for the same length on
//! every machine, so that sums taken by task give the same bits everywhere.

/// About this many elements per rayon task in this crate's hand-written CPU passes (the fused
/// kernels, AdamW, dropout, the gradient norm): large enough that scheduling is noise next to
/// the work, small enough that two or more threads share a 384-wide layer's tensors.
pub const PARALLEL_CHUNK: usize = 1 << 15;

/// A pass split into tasks makes a multiple of this many, so that two or four cores finish
/// together: cut into whole [`PARALLEL_CHUNK`]s, a batch of 16 × 17 tokens (104,448 values at
/// width 384) made three full tasks and a fifth of one, and one core waited on the other for
/// two fifths of every elementwise pass. The count depends on the length alone, not on the machine,
/// so the passes that sum by task (norms, bias gradients) give the same bits everywhere.
const TASKS_IN_STEPS_OF: usize = 4;

/// Elementwise tasks are whole 16-lane vectors (AVX-512's f32 width, a 64-byte cache line).
pub const LANE: usize = 16;

/// The length of each task when a pass over `len` values splits into tasks: a multiple of
/// `unit` (a row's width, or a vector's), about [`PARALLEL_CHUNK`] values, and all of `len` (one
/// task) up to one [`PARALLEL_CHUNK`]. Never zero, as `par_chunks` requires.
#[inline]
pub fn task_len(len: usize, unit: usize) -> usize {
    let unit = unit.max(1);
    let tasks = match len.div_ceil(PARALLEL_CHUNK) {
        0 | 1 => 1,
        tasks => tasks.next_multiple_of(TASKS_IN_STEPS_OF),
    };
    len.div_ceil(tasks).next_multiple_of(unit).max(unit)
}

#[cfg(test)]
mod tests {
    use super::{PARALLEL_CHUNK, task_len};

    #[test]
    fn tasks_come_in_fours_of_whole_units_and_cover_the_pass() {
        // Up to one chunk: one task. Above: a multiple of four tasks, each a whole number of
        // units, that cover every value, the last one no longer than the others.
        assert_eq!(task_len(0, 16), 16);
        assert_eq!(task_len(100, 16), 112);
        assert_eq!(
            task_len(PARALLEL_CHUNK, 384),
            PARALLEL_CHUNK.next_multiple_of(384)
        );
        for (len, unit) in [
            (104_448, 16),
            (104_448, 384),
            (589_824, 16),
            (40_000, 8),
            (65_537, 1),
        ] {
            let task = task_len(len, unit);
            let tasks = len.div_ceil(task);
            assert_eq!(task % unit, 0, "{len} by {unit}");
            assert_eq!(tasks % 4, 0, "{len} by {unit}: {tasks} tasks of {task}");
            assert!(task <= PARALLEL_CHUNK, "{len} by {unit}: {task}");
        }
    }
}
