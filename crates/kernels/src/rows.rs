//! An embedding table's gradient as the rows a batch looked up, so that neither the backward
//! nor the optimizer touches the rows it did not use.

/// An embedding table's gradient as the rows a lookup used. Row `id` is the sum of the output
/// gradient's rows at the positions that looked `id` up, added from zero in position order, as
/// the dense backward adds them; rows not held are zero.
#[derive(Debug, Clone, PartialEq)]
pub struct RowGradient {
    dim: usize,
    /// For each row of the table, its place in `ids` and `values`, or [`ABSENT`].
    slots: Vec<u32>,
    ids: Vec<usize>,
    /// `ids.len() × dim` sums.
    values: Vec<f32>,
}

const ABSENT: u32 = u32::MAX;

impl RowGradient {
    /// The gradient of a `[table_rows, dim]` table from a lookup of `ids` (in position order)
    /// whose output's gradient is `grad` (`ids.len() × dim`, in the same order).
    pub fn from_lookup(table_rows: usize, dim: usize, ids: &[usize], grad: &[f32]) -> Self {
        assert_eq!(
            grad.len(),
            ids.len() * dim,
            "one gradient row per looked-up id"
        );
        let mut rows = RowGradient {
            dim,
            slots: vec![ABSENT; table_rows],
            ids: Vec::new(),
            values: Vec::new(),
        };
        for (&id, row) in ids.iter().zip(grad.chunks_exact(dim.max(1))) {
            rows.add_row(id, row);
        }
        rows
    }

    /// Adds another micro-batch's rows into these (what the dense accumulator's `a + b` does).
    pub fn accumulate(&mut self, other: &RowGradient) {
        assert_eq!(
            (self.dim, self.slots.len()),
            (other.dim, other.slots.len()),
            "gradients of one table"
        );
        for (id, row) in other.rows() {
            self.add_row(id, row);
        }
    }

    fn add_row(&mut self, id: usize, row: &[f32]) {
        let slot = match self.slots[id] {
            ABSENT => {
                let slot = self.ids.len();
                self.slots[id] = u32::try_from(slot).expect("fewer rows than u32::MAX");
                self.ids.push(id);
                self.values.resize(self.values.len() + self.dim, 0.0);
                slot
            }
            slot => slot as usize,
        };
        let sums = &mut self.values[slot * self.dim..(slot + 1) * self.dim];
        sums.iter_mut().zip(row).for_each(|(sum, g)| *sum += g);
    }

    /// Row `id`, if the lookup used it.
    #[inline]
    pub fn row(&self, id: usize) -> Option<&[f32]> {
        match self.slots.get(id).copied() {
            None | Some(ABSENT) => None,
            Some(slot) => {
                let start = slot as usize * self.dim;
                Some(&self.values[start..start + self.dim])
            }
        }
    }

    /// The rows held, as `(id, row)`, in the order they were first used.
    #[inline]
    pub fn rows(&self) -> impl Iterator<Item = (usize, &[f32])> {
        self.ids
            .iter()
            .copied()
            .zip(self.values.chunks_exact(self.dim.max(1)))
    }

    /// The rows of the whole table, held or not.
    #[inline]
    pub fn table_rows(&self) -> usize {
        self.slots.len()
    }

    /// The width of a row.
    #[inline]
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Every value held (the rows not held are zero).
    #[inline]
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// The dense `[table_rows × dim]` gradient, row-major.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut dense = vec![0.0; self.slots.len() * self.dim];
        for (id, row) in self.rows() {
            dense[id * self.dim..(id + 1) * self.dim].copy_from_slice(row);
        }
        dense
    }
}
