//! Memory that a kernel writes before anything reads it, handled as `MaybeUninit<f32>` until
//! every value is written, so that no `&[f32]` ever views an uninitialised value.
//!
//! A kernel's output starts uninitialised: zeroing it first (`vec![0.0; n]`) was a pass on
//! one core while the other waited, 3% of a training run. In the crate's unit tests it starts
//! as NaN instead, so that a value a kernel leaves unwritten fails its comparison with burn.

use std::mem::{ManuallyDrop, MaybeUninit};

use burn::backend::flex::FlexTensor;
use burn::tensor::{Shape, TensorData};

/// A tensor's values before a kernel has written them: `Vec<f32>`'s allocation, aligned
/// already (burn-flex's `FlexTensor::empty` allocates bytes and copies them into an aligned
/// buffer, two passes over every new tensor).
pub(crate) struct Unwritten {
    values: Vec<MaybeUninit<f32>>,
    shape: Shape,
}

impl Unwritten {
    pub(crate) fn new(shape: Shape) -> Self {
        let len = shape.num_elements();
        let values = if cfg!(test) {
            vec![MaybeUninit::new(f32::NAN); len]
        } else {
            slots(len)
        };
        Unwritten { values, shape }
    }

    /// The values to write.
    pub(crate) fn slots(&mut self) -> &mut [MaybeUninit<f32>] {
        &mut self.values
    }

    /// The tensor, once every value is written.
    ///
    /// # Safety
    /// Every slot has been written.
    pub(crate) unsafe fn into_tensor(self) -> FlexTensor {
        let mut values = ManuallyDrop::new(self.values);
        let (ptr, len, capacity) = (values.as_mut_ptr(), values.len(), values.capacity());
        // SAFETY: `MaybeUninit<f32>` has `f32`'s size and alignment, so the allocation is the
        // one a `Vec<f32>` of this capacity makes; the `ManuallyDrop` gives up the old owner;
        // and every value is initialised (the caller's promise).
        let values = unsafe { Vec::from_raw_parts(ptr.cast::<f32>(), len, capacity) };
        FlexTensor::from_data(TensorData::new(values, self.shape))
    }
}

/// `len` slots of scratch space, uninitialised.
pub(crate) fn slots(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut slots = Vec::with_capacity(len);
    // SAFETY: the capacity holds `len` values, and an uninitialised `MaybeUninit<f32>` is a
    // valid one: `MaybeUninit` has no validity requirement.
    unsafe { slots.set_len(len) };
    slots
}

/// `slots` as the values written into them.
///
/// # Safety
/// Every slot has been written.
pub(crate) unsafe fn written(slots: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and every slot holds an initialised f32
    // (the caller's promise); the borrow is the slots' own.
    unsafe { &mut *(slots as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Writes `values` into `slots` (of the same length), and returns them as written.
pub(crate) fn write_all<'a>(slots: &'a mut [MaybeUninit<f32>], values: &[f32]) -> &'a mut [f32] {
    assert_eq!(
        slots.len(),
        values.len(),
        "a copy into slots of another length"
    );
    for (slot, &value) in slots.iter_mut().zip(values) {
        slot.write(value);
    }
    // SAFETY: the loop wrote every slot (the lengths are equal).
    unsafe { written(slots) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_slots_become_the_tensor_values() {
        let mut out = Unwritten::new(Shape::new([2, 3]));
        let slots = out.slots();
        assert_eq!(slots.len(), 6);
        let values = write_all(slots, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        values[5] = 7.0;
        // SAFETY: `write_all` wrote all six.
        let tensor = unsafe { out.into_tensor() };
        assert_eq!(tensor.layout().shape(), &Shape::new([2, 3]));
        assert_eq!(tensor.storage::<f32>(), [1.0, 2.0, 3.0, 4.0, 5.0, 7.0]);
    }
}
