//! The exact path's matrix product on the CPU, `y = x · W_t` (`x` `[m, k]`, `W_t` `[k, n]`,
//! both row-major f32), with one summation order on every CPU.
//!
//! Every output is summed over the input in order, one fused multiply-add at a time:
//! `y[t, o] = fma(x[t, k−1], w[k−1, o], … fma(x[t, 1], w[1, o], fma(x[t, 0], w[0, o], 0)))`.
//! SIMD lanes hold different outputs `o`, never parts of one sum, so the AVX-512 kernel (64
//! outputs per panel), the AVX2 + FMA one (16) and the scalar code (`f32::mul_add`) give the
//! same bits, and so does any split of the work between threads. gemm's kernels, which this
//! replaces on the exact path, sum in blocks whose order depends on the SIMD tier and the
//! cache sizes, so the same model gave different last bits on an AVX-512 and an AVX2 CPU.
//!
//! It is also faster for the exact path's shapes (a prompt of tens of tokens against weights
//! that do not fit in cache): a panel of `W_t` (`k` rows × 64 outputs) is read from memory
//! once and then from L2 for each further block of six tokens. Weights stored in panels
//! ([`matmul_panels`]) are read in order, and the blocks after the first fetch the next panel
//! meanwhile; row-major weights are copied out a panel at a time, with software prefetching
//! (their rows are `n` floats apart, farther than the hardware prefetchers follow).

use candle_core::utils::get_num_threads;

/// Which kernel runs; every one gives the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Avx512,
    Avx2,
    Scalar,
}

impl Kernel {
    /// The fastest this CPU has, or the one `REFUSAL_LENS_EXACT_KERNEL` (`avx512`, `avx2`,
    /// `scalar`) names if the CPU has it. `MISTRALRS_FORCE_AVX2=1`, which makes the quantised
    /// path run its AVX2 tier, makes this one run AVX2 too.
    pub fn detect() -> Kernel {
        static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            let best = Kernel::best();
            let forced = std::env::var(Self::ENV).ok().or_else(|| {
                (std::env::var(super::weights::KernelTier::FORCE_AVX2_ENV).as_deref() == Ok("1"))
                    .then(|| "avx2".to_string())
            });
            match forced.as_deref() {
                Some("scalar") => Kernel::Scalar,
                Some("avx2") if best != Kernel::Scalar => Kernel::Avx2,
                _ => best,
            }
        })
    }

    pub const ENV: &'static str = "REFUSAL_LENS_EXACT_KERNEL";

    fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Kernel::Avx2;
            }
        }
        Kernel::Scalar
    }

    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        matches!(
            (self, Kernel::best()),
            (Kernel::Scalar, _) | (_, Kernel::Avx512) | (Kernel::Avx2, Kernel::Avx2)
        )
    }

    /// Outputs per panel.
    fn panel(self) -> usize {
        match self {
            Kernel::Avx512 => 64,
            Kernel::Avx2 => 16,
            Kernel::Scalar => 1,
        }
    }
}

/// Tokens (rows of `x`) per register block.
const TOKENS: usize = 6;

/// Outputs per panel of the packed layout (`[n / PANEL, k, PANEL]`): one AVX-512 block, four
/// AVX2 ones.
pub const PANEL: usize = 64;

/// How `W_t` is laid out.
#[derive(Clone, Copy)]
enum Layout<'a> {
    /// Row-major `[k, n]`.
    Rows(&'a [f32]),
    /// In panels, `[n / PANEL, k, PANEL]`: each panel's rows follow each other in memory.
    Panels(&'a [f32]),
}

/// `y = x · w_t` with `x` `[m, k]`, `w_t` `[k, n]` and `y` `[m, n]`, all row-major, on the
/// threads candle's products use (`RAYON_NUM_THREADS`).
pub fn matmul(x: &[f32], w_t: &[f32], y: &mut [f32], m: usize, k: usize, n: usize) {
    matmul_with(Kernel::detect(), get_num_threads(), x, w_t, y, m, k, n)
}

/// [`matmul`] with `W_t` in panels, `[n / PANEL, k, PANEL]` (`n` a multiple of [`PANEL`]):
/// the same bits, its weights read from memory in order.
pub fn matmul_panels(x: &[f32], panels: &[f32], y: &mut [f32], m: usize, k: usize, n: usize) {
    matmul_panels_with(Kernel::detect(), get_num_threads(), x, panels, y, m, k, n)
}

/// [`matmul`] on a given kernel and number of threads (the result does not depend on either).
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    kernel: Kernel,
    threads: usize,
    x: &[f32],
    w_t: &[f32],
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(w_t.len(), k * n, "w_t is not [k, n]");
    product(kernel, threads, x, Layout::Rows(w_t), y, m, k, n)
}

/// [`matmul_panels`] on a given kernel and number of threads.
#[allow(clippy::too_many_arguments)]
pub fn matmul_panels_with(
    kernel: Kernel,
    threads: usize,
    x: &[f32],
    panels: &[f32],
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    assert!(n.is_multiple_of(PANEL), "{n} outputs are not whole panels");
    assert_eq!(panels.len(), k * n, "panels are not [n / PANEL, k, PANEL]");
    product(kernel, threads, x, Layout::Panels(panels), y, m, k, n)
}

#[allow(clippy::too_many_arguments)]
fn product(
    kernel: Kernel,
    threads: usize,
    x: &[f32],
    w: Layout,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    assert!(
        kernel.available(),
        "{kernel:?} is not available on this CPU"
    );
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(y.len(), m * n, "y is not [m, n]");
    let p = kernel.panel();
    let panels = n / p;
    // Threads share the panels; a thread gets at least 4 (tiny products stay on one).
    let threads = threads.clamp(1, (panels / 4).max(1));
    let out = SharedOut(y.as_mut_ptr());
    let run = |from: usize, to: usize| {
        let out = &out;
        // SAFETY: panels `from..to` write only their own columns of `y`, whose size was
        // checked above, and the kernel's features were checked by `available`.
        unsafe { panels_range(kernel, x, w, out.0, m, k, n, from, to) }
    };
    if threads == 1 {
        run(0, panels);
    } else {
        let per = panels.div_ceil(threads);
        let run = &run;
        rayon::scope(|s| {
            for from in (per..panels).step_by(per) {
                s.spawn(move |_| run(from, (from + per).min(panels)));
            }
            run(0, per.min(panels));
        });
    }
    // Outputs past the last whole panel (row-major weights only), one at a time.
    if let Layout::Rows(w_t) = w {
        for o in panels * p..n {
            // SAFETY: column `o < n` of `x · w_t`, within the sizes checked above.
            unsafe {
                scalar_block(
                    m,
                    x.as_ptr(),
                    w_t.as_ptr().add(o),
                    n,
                    y.as_mut_ptr().add(o),
                    k,
                    n,
                )
            }
        }
    }
}

/// The output pointer, shared by threads that write disjoint columns.
struct SharedOut(*mut f32);
// SAFETY: see `matmul_with`: each thread writes its own columns only.
unsafe impl Sync for SharedOut {}

/// Panels `from..to` of the product, every block of tokens.
///
/// # Safety
/// `y` must hold `m · n` floats, and the CPU must have `kernel`'s features.
#[allow(clippy::too_many_arguments)]
unsafe fn panels_range(
    kernel: Kernel,
    x: &[f32],
    w: Layout,
    y: *mut f32,
    m: usize,
    k: usize,
    n: usize,
    from: usize,
    to: usize,
) {
    let p = kernel.panel();
    // A panel read by more than one block of tokens is first copied out contiguously: its
    // rows lie `n` floats apart, which for widths like 1536 puts them in a few L1 sets that
    // evict each other, and farther apart than the hardware prefetchers follow.
    let pack = matches!(w, Layout::Rows(_)) && m > TOKENS && kernel != Kernel::Scalar;
    let mut packed = vec![0f32; if pack { k * p } else { 0 }];
    for panel in from..to {
        let o = panel * p;
        let w_layout = w;
        let (w, w_stride) = match w {
            Layout::Panels(panels) => (
                panels.as_ptr().add((o / PANEL) * k * PANEL + o % PANEL),
                PANEL,
            ),
            Layout::Rows(w_t) if pack => {
                for i in 0..k {
                    #[cfg(target_arch = "x86_64")]
                    x86::prefetch(w_t.as_ptr().wrapping_add((i + x86::AHEAD) * n + o), p);
                    packed[i * p..(i + 1) * p].copy_from_slice(&w_t[i * n + o..i * n + o + p]);
                }
                (packed.as_ptr(), p)
            }
            Layout::Rows(w_t) => (w_t.as_ptr().add(o), n),
        };
        // Packed panels: while the blocks after the first read this panel from cache, they
        // fetch the next one from memory, a share of its rows each.
        let next = match w_layout {
            Layout::Panels(_) if panel + 1 < to => w.wrapping_add(next_offset(o, p, k)),
            _ => std::ptr::null(),
        };
        let later_blocks = m.div_ceil(TOKENS).saturating_sub(1).max(1);
        let share = k.div_ceil(later_blocks);
        let mut t = 0;
        while t < m {
            let rows = TOKENS.min(m - t);
            let xs = x.as_ptr().add(t * k);
            let out = y.add(t * n + o);
            let block = t / TOKENS;
            let ahead = if block == 0 || next.is_null() {
                NO_AHEAD
            } else {
                let from = ((block - 1) * share).min(k);
                (next, from, (from + share).min(k))
            };
            match kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => x86::avx512_block(rows, xs, w, w_stride, out, k, n, ahead),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => x86::avx2_block(rows, xs, w, w_stride, out, k, n, ahead),
                _ => scalar_block(rows, xs, w, w_stride, out, k, n),
            }
            t += rows;
        }
    }
}

/// Where the next column block starts, relative to this one's start, in the packed layout:
/// the next `p` columns of the same panel, or the next panel's first.
fn next_offset(o: usize, p: usize, k: usize) -> usize {
    if (o + p).is_multiple_of(PANEL) {
        (k - 1) * PANEL + p
    } else {
        p
    }
}

/// Rows `from..to` of the next column block (at `next`, rows [`PANEL`] floats apart) to fetch
/// into cache while a block is computed, spread evenly over its steps.
type Ahead = (*const f32, usize, usize);

/// No rows to fetch.
const NO_AHEAD: Ahead = (std::ptr::null(), 0, 0);

/// One output column for `rows` tokens.
///
/// # Safety
/// As [`panels_range`].
unsafe fn scalar_block(
    rows: usize,
    x: *const f32,
    w: *const f32,
    w_stride: usize,
    y: *mut f32,
    k: usize,
    n: usize,
) {
    for t in 0..rows {
        let mut acc = 0f32;
        for i in 0..k {
            acc = (*x.add(t * k + i)).mul_add(*w.add(i * w_stride), acc);
        }
        *y.add(t * n) = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Ahead;

    /// Rows of `W_t` fetched ahead of the one being read.
    pub(super) const AHEAD: usize = 32;

    /// Fetches the cache lines of `floats` floats from `at` (which may lie past the end of
    /// the matrix: a prefetch never faults).
    #[inline(always)]
    pub(super) fn prefetch(at: *const f32, floats: usize) {
        for line in (0..floats).step_by(16) {
            // SAFETY: prefetching has no architectural effect; the address is not read.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(line) as *const i8) };
        }
    }

    /// Spreads the fetches of `ahead`'s rows evenly over a block's `k` steps without a
    /// division per step: each step adds the row count to a budget and fetches a row for
    /// every `k` it holds.
    struct Fetcher {
        next: *const f32,
        row: usize,
        to: usize,
        budget: usize,
        per_step: usize,
        k: usize,
        floats: usize,
    }

    impl Fetcher {
        #[inline(always)]
        fn new(ahead: Ahead, k: usize, floats: usize) -> Fetcher {
            let (next, from, to) = ahead;
            Fetcher {
                next,
                row: from,
                to: if next.is_null() { from } else { to.max(from) },
                budget: 0,
                per_step: to.saturating_sub(from),
                k: k.max(1),
                floats,
            }
        }

        #[inline(always)]
        fn step(&mut self) {
            if self.row >= self.to {
                return;
            }
            self.budget += self.per_step;
            while self.budget >= self.k && self.row < self.to {
                self.budget -= self.k;
                prefetch(self.next.wrapping_add(self.row * super::PANEL), self.floats);
                self.row += 1;
            }
        }
    }

    /// Dispatches a block of `rows ≤ 6` tokens to the kernel compiled for that many.
    macro_rules! by_rows {
        ($rows:expr, $f:ident, $($arg:expr),*) => {
            match $rows {
                1 => $f::<1>($($arg),*),
                2 => $f::<2>($($arg),*),
                3 => $f::<3>($($arg),*),
                4 => $f::<4>($($arg),*),
                5 => $f::<5>($($arg),*),
                _ => $f::<6>($($arg),*),
            }
        };
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn avx512_block(
        rows: usize,
        x: *const f32,
        w: *const f32,
        w_stride: usize,
        y: *mut f32,
        k: usize,
        n: usize,
        ahead: Ahead,
    ) {
        by_rows!(rows, avx512, x, w, w_stride, y, k, n, ahead)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn avx2_block(
        rows: usize,
        x: *const f32,
        w: *const f32,
        w_stride: usize,
        y: *mut f32,
        k: usize,
        n: usize,
        ahead: Ahead,
    ) {
        by_rows!(rows, avx2, x, w, w_stride, y, k, n, ahead)
    }

    /// `T` tokens × 64 outputs: 4·T accumulators of 16 lanes, one FMA per input per output.
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<const T: usize>(
        x: *const f32,
        w: *const f32,
        w_stride: usize,
        y: *mut f32,
        k: usize,
        n: usize,
        ahead: Ahead,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; T];
        let mut fetcher = Fetcher::new(ahead, k, 64);
        for i in 0..k {
            fetcher.step();
            let row = w.add(i * w_stride);
            // Rows of a panel follow each other; spread rows need fetching ahead.
            if w_stride > super::PANEL {
                prefetch(row.wrapping_add(AHEAD * w_stride), 64);
            }
            let ws = [
                _mm512_loadu_ps(row),
                _mm512_loadu_ps(row.add(16)),
                _mm512_loadu_ps(row.add(32)),
                _mm512_loadu_ps(row.add(48)),
            ];
            for (t, acc) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*x.add(t * k + i));
                for (a, w) in acc.iter_mut().zip(ws) {
                    *a = _mm512_fmadd_ps(b, w, *a);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for (j, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(y.add(t * n + 16 * j), *a);
            }
        }
    }

    /// `T` tokens × 16 outputs: 2·T accumulators of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const T: usize>(
        x: *const f32,
        w: *const f32,
        w_stride: usize,
        y: *mut f32,
        k: usize,
        n: usize,
        ahead: Ahead,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        let mut fetcher = Fetcher::new(ahead, k, 16);
        for i in 0..k {
            fetcher.step();
            let row = w.add(i * w_stride);
            if w_stride > super::PANEL {
                prefetch(row.wrapping_add(AHEAD * w_stride), 16);
            }
            let ws = [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))];
            for (t, acc) in acc.iter_mut().enumerate() {
                let b = _mm256_set1_ps(*x.add(t * k + i));
                for (a, w) in acc.iter_mut().zip(ws) {
                    *a = _mm256_fmadd_ps(b, w, *a);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for (j, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(y.add(t * n + 8 * j), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        // Values of mixed magnitude, so that a different summation order shows in the bits.
        (0..len)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                ((h >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
                    * if h.is_multiple_of(7) { 100.0 } else { 1.0 }
            })
            .collect()
    }

    /// Every kernel, thread count and shape (panels, token blocks and tails) gives the bits of
    /// the in-order sum; a product summed in another order would not.
    #[test]
    fn every_kernel_and_thread_count_gives_the_in_order_sums() {
        for (m, k, n) in [
            (1, 7, 1),
            (5, 33, 80),
            (13, 64, 200),
            (40, 576, 192),
            (7, 100, 1031),
            (2, 9, 128),
        ] {
            let x = data(m * k, 1);
            let w = data(k * n, 2);
            let mut want = vec![0f32; m * n];
            for t in 0..m {
                for o in 0..n {
                    let mut acc = 0f32;
                    for i in 0..k {
                        acc = x[t * k + i].mul_add(w[i * n + o], acc);
                    }
                    want[t * n + o] = acc;
                }
            }
            for kernel in [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512] {
                if !kernel.available() {
                    eprintln!("{kernel:?} not available on this CPU");
                    continue;
                }
                for threads in [1, 2, 3] {
                    let mut y = vec![f32::NAN; m * n];
                    matmul_with(kernel, threads, &x, &w, &mut y, m, k, n);
                    let same = y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{kernel:?}, {threads} threads, {m}×{k}×{n}");
                    if n.is_multiple_of(PANEL) {
                        let mut panels = Vec::with_capacity(k * n);
                        for p in 0..n / PANEL {
                            for i in 0..k {
                                panels.extend_from_slice(
                                    &w[i * n + p * PANEL..i * n + (p + 1) * PANEL],
                                );
                            }
                        }
                        let mut y = vec![f32::NAN; m * n];
                        matmul_panels_with(kernel, threads, &x, &panels, &mut y, m, k, n);
                        let same = y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "panels: {kernel:?}, {threads} threads, {m}×{k}×{n}");
                    }
                }
            }
            // The check can fail: pairwise sums differ in the last bits.
            if k >= 64 {
                let pairwise: Vec<f32> = (0..m * n)
                    .map(|j| {
                        let (t, o) = (j / n, j % n);
                        let half = |r: std::ops::Range<usize>| {
                            r.fold(0f32, |acc, i| x[t * k + i].mul_add(w[i * n + o], acc))
                        };
                        half(0..k / 2) + half(k / 2..k)
                    })
                    .collect();
                assert!(pairwise
                    .iter()
                    .zip(&want)
                    .any(|(a, b)| a.to_bits() != b.to_bits()));
            }
        }
    }
}
