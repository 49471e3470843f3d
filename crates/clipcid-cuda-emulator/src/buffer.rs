//! Buffers for emulated kernels, with guard bytes on both sides to catch writes out of bounds.

use std::cell::UnsafeCell;

use crate::EmulatorError;

/// Bytes of guard before and after the values (a multiple of 16, so that the values keep
/// the 16-byte alignment `uint4` loads need).
const GUARD: usize = 256;
/// What the guards hold.
const PATTERN: u8 = 0xa5;

/// Values of `T` that an emulated kernel reads and writes through a raw pointer, between two
/// guards of known bytes: [`check_guards`](Self::check_guards) says whether the kernel wrote
/// past either end. The values start 16-byte aligned.
///
/// ```
/// use clipcid_cuda_emulator::GuardedBuffer;
/// let b = GuardedBuffer::new(&[1u32, 2, 3]);
/// assert_eq!(b.values(), vec![1, 2, 3]);
/// // SAFETY: index 3 is past the values but inside the guard after them.
/// unsafe { b.as_ptr().add(3).write(7) };
/// assert!(b.check_guards().is_err());
/// ```
pub struct GuardedBuffer<T: Copy> {
    /// Guard, values, guard; u128 words for the alignment.
    storage: UnsafeCell<Vec<u128>>,
    len: usize,
    _values: std::marker::PhantomData<T>,
}

impl<T: Copy> GuardedBuffer<T> {
    /// A buffer holding a copy of `values`.
    pub fn new(values: &[T]) -> Self {
        let bytes = std::mem::size_of_val(values);
        let words = (2 * GUARD + bytes).div_ceil(16);
        let mut storage = vec![0u128; words];
        // SAFETY: `storage` has at least 2 GUARD + `bytes` bytes; the values go at byte GUARD
        // (a multiple of 16, so aligned for T), their bytes copied from a valid slice.
        unsafe {
            let base = storage.as_mut_ptr().cast::<u8>();
            std::ptr::write_bytes(base, PATTERN, words * 16);
            std::ptr::copy_nonoverlapping(values.as_ptr().cast::<u8>(), base.add(GUARD), bytes);
        }
        Self {
            storage: UnsafeCell::new(storage),
            len: values.len(),
            _values: std::marker::PhantomData,
        }
    }

    /// How many values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first value's address, for a kernel's argument (kernels write through it).
    pub fn as_ptr(&self) -> *mut T {
        // SAFETY: byte GUARD is inside the storage (see `new`).
        unsafe {
            (*self.storage.get())
                .as_mut_ptr()
                .cast::<u8>()
                .add(GUARD)
                .cast::<T>()
        }
    }

    /// A copy of the values as they are now.
    pub fn values(&self) -> Vec<T> {
        // SAFETY: `len` values of T lie at `as_ptr()`, initialised by `new` (kernels store
        // whole values of T there).
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len).to_vec() }
    }

    /// An error if any guard byte changed (a write out of bounds).
    pub fn check_guards(&self) -> Result<(), EmulatorError> {
        // SAFETY: the storage is alive and no launch runs while `&self` is read here (launches
        // run to their end before returning).
        let all = unsafe {
            let s = &*self.storage.get();
            std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), s.len() * 16)
        };
        let end = GUARD + self.len * std::mem::size_of::<T>();
        for (range, where_) in [(&all[..GUARD], "before"), (&all[end..], "after")] {
            let bytes = range.iter().filter(|&&b| b != PATTERN).count();
            if bytes > 0 {
                return Err(EmulatorError::OutOfBounds {
                    bytes,
                    len: self.len,
                    where_,
                });
            }
        }
        Ok(())
    }
}

impl<T: Copy + std::fmt::Debug> std::fmt::Debug for GuardedBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedBuffer")
            .field("values", &self.values())
            .finish()
    }
}
