//! The per-file write pipeline: a producer (the caller's thread: positioned reads of the source
//! and dtype conversion, straight into aligned blocks), a hasher thread (sha256 over the bytes in
//! file order; it also gives each block its file offset) and `WRITERS` writer threads (O_DIRECT
//! `pwrite` of whole blocks at their offsets, so two writes are in flight at once). The stages
//! overlap: while the writers wait on the disk for blocks k and k+1, the hasher digests block
//! k+2 and the producer reads block k+3. Blocks circulate through a fixed ring of `RING` aligned
//! buffers (free → producer → hasher → writers → free), so memory per file is bounded by
//! `RING × BLOCK` (48 MiB).
//!
//! Hand-written on std threads and bounded `sync_channel`s: a few stages with a fixed buffer
//! pool are a few dozen lines, and the crates that offer pipelines (rayon, crossbeam) would
//! add nothing here but another scheduler to reason about.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::error::{ConvertError, Result};

/// Output block size: each O_DIRECT write is one whole block (the last one padded).
pub const BLOCK: usize = 8 << 20;
/// Blocks in flight per file: enough that each stage has one to work on and one queued.
pub const RING: usize = 6;
/// Writer threads per file: O_DIRECT writes are synchronous, and this disk completes two
/// concurrent streams faster than one (bench/RESULTS.md, read+write ceilings).
pub const WRITERS: usize = 2;
/// O_DIRECT alignment (the logical block size of any disk we meet is at most 4 KiB).
pub const ALIGN: usize = 4096;

/// A heap buffer aligned for O_DIRECT. Hand-written (a few lines of `std::alloc`) rather than
/// pulling in a crate for it.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: the buffer is uniquely owned heap memory; moving it between threads moves ownership.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn layout(cap: usize) -> std::alloc::Layout {
        // Only called with BLOCK (a non-zero multiple of ALIGN) and ALIGN (a power of two).
        std::alloc::Layout::from_size_align(cap, ALIGN).expect("BLOCK/ALIGN form a valid layout")
    }

    fn new(cap: usize) -> Self {
        let layout = Self::layout(cap);
        // SAFETY: layout has non-zero size. Zeroed so every byte is initialized (the kernel
        // hands out zero pages lazily, so this costs nothing until touched).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, cap, len: 0 }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `len <= cap` initialized bytes of an allocation we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The whole allocation, `len` included (the writer pads the tail with zeros).
    fn whole_mut(&mut self) -> &mut [u8] {
        // SAFETY: `cap` initialized bytes of an allocation we own, borrowed mutably via &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }

    fn spare(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.whole_mut()[len..]
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

/// Raised by the producer's side when a later stage has stopped; the stage's own error is the
/// one reported.
fn stopped() -> ConvertError {
    ConvertError::Invalid("internal: the hashing/writing stage stopped".into())
}

/// The producer's handle: fills blocks in file order and hands full ones on.
pub struct Sink {
    free: Receiver<AlignedBuf>,
    full: SyncSender<AlignedBuf>,
    cur: Option<AlignedBuf>,
    written: u64,
}

impl Sink {
    fn block(&mut self) -> Result<&mut AlignedBuf> {
        if self.cur.is_none() {
            let mut b = self.free.recv().map_err(|_| stopped())?;
            b.len = 0;
            self.cur = Some(b);
        }
        self.cur.as_mut().ok_or_else(stopped)
    }

    fn send_if_full(&mut self) -> Result<()> {
        if self.cur.as_ref().is_some_and(|b| b.len == b.cap)
            && let Some(b) = self.cur.take()
        {
            self.full.send(b).map_err(|_| stopped())?;
        }
        Ok(())
    }

    /// Appends `b`.
    pub fn write(&mut self, mut b: &[u8]) -> Result<()> {
        while !b.is_empty() {
            let blk = self.block()?;
            let spare = blk.spare();
            let n = spare.len().min(b.len());
            spare[..n].copy_from_slice(&b[..n]);
            blk.len += n;
            self.written += n as u64;
            b = &b[n..];
            self.send_if_full()?;
        }
        Ok(())
    }

    /// Appends `n` bytes of `src` from byte `at`, read straight into the blocks (no staging
    /// copy). `on_err(at, len, e)` names what failed.
    pub fn read_from(
        &mut self,
        src: &File,
        mut at: u64,
        mut n: usize,
        on_err: &dyn Fn(u64, usize, std::io::Error) -> ConvertError,
    ) -> Result<()> {
        while n > 0 {
            let blk = self.block()?;
            let spare = blk.spare();
            let k = spare.len().min(n);
            src.read_exact_at(&mut spare[..k], at)
                .map_err(|e| on_err(at, k, e))?;
            blk.len += k;
            self.written += k as u64;
            at += k as u64;
            n -= k;
            self.send_if_full()?;
        }
        Ok(())
    }

    /// Hands on the last, partial block.
    fn finish(mut self) -> Result<()> {
        if let Some(b) = self.cur.take()
            && b.len > 0
        {
            self.full.send(b).map_err(|_| stopped())?;
        }
        Ok(())
    }
}

/// What the pipeline wrote: bytes and their sha256.
pub struct Output {
    pub size: u64,
    pub sha256: sha2::digest::Output<Sha256>,
}

/// Runs `produce` on this thread with a hasher and a writer thread behind it, writing to `out`
/// (`path` names it in errors; `direct`: `out` was opened with O_DIRECT, so whole aligned
/// blocks are written and the file is cut back to its real length). Returns once every byte is
/// on disk and fsynced. The first error of any stage is returned; the writer's and producer's
/// own errors win over the "stage stopped" they cause each other.
pub fn run(
    out: &File,
    path: &Path,
    direct: bool,
    produce: impl FnOnce(&mut Sink) -> Result<()>,
) -> Result<Output> {
    let (free_tx, free_rx) = sync_channel::<AlignedBuf>(RING);
    let (full_tx, full_rx) = sync_channel::<AlignedBuf>(RING);
    let (hashed_tx, hashed_rx) = sync_channel::<(u64, AlignedBuf)>(RING);
    // The writers share one queue; a block goes to whichever is free first. It is dropped with
    // the last writer, so if every writer stops on an error the hasher's send fails instead of
    // waiting for ever.
    let hashed_rx = Arc::new(Mutex::new(hashed_rx));
    for _ in 0..RING {
        free_tx
            .send(AlignedBuf::new(BLOCK))
            .map_err(|_| stopped())?;
    }
    let (produced, hashed, written) = std::thread::scope(|s| {
        let hasher = s.spawn(move || hash_stage(full_rx, hashed_tx, path));
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let free = free_tx.clone();
                let queue = hashed_rx.clone();
                s.spawn(move || write_stage(out, path, direct, &queue, free))
            })
            .collect();
        // Only the writers hold the free-block sender and the queue now: if they all stop, the
        // producer's wait for a free block and the hasher's send end.
        drop(free_tx);
        drop(hashed_rx);
        let mut sink = Sink {
            free: free_rx,
            full: full_tx,
            cur: None,
            written: 0,
        };
        let produced = match produce(&mut sink) {
            Ok(()) => {
                let n = sink.written;
                sink.finish().map(|()| n)
            }
            Err(e) => {
                drop(sink);
                Err(e)
            }
        };
        // `sink` (and with it the full-block sender) is gone here either way, so the hasher
        // sees the end instead of waiting for a block that never comes.
        let hashed = hasher
            .join()
            .unwrap_or_else(|_| Err(ConvertError::Invalid("the hasher thread panicked".into())));
        let mut written = Ok(0u64);
        for w in writers {
            let r = w
                .join()
                .unwrap_or_else(|_| Err(ConvertError::Invalid("a writer thread panicked".into())));
            written = match (written, r) {
                (Ok(a), Ok(b)) => Ok(a + b),
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            };
        }
        (produced, hashed, written)
    });
    let written = written?;
    let size = produced?;
    let (hash, hashed_bytes) = hashed?;
    if written != size || hashed_bytes != size {
        return Err(ConvertError::Invalid(format!(
            "internal: {} got {size} bytes, hashed {hashed_bytes}, wrote {written}",
            path.display()
        )));
    }
    if direct {
        out.set_len(size).map_err(|e| ConvertError::io(path, e))?;
    }
    out.sync_all().map_err(|e| ConvertError::io(path, e))?;
    Ok(Output { size, sha256: hash })
}

type Digested = (sha2::digest::Output<Sha256>, u64);

fn hash_stage(
    full: Receiver<AlignedBuf>,
    hashed: SyncSender<(u64, AlignedBuf)>,
    path: &Path,
) -> Result<Digested> {
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut last_partial = false;
    // Ends when the producer drops its sender (done, or failed: then its error is reported).
    for b in full {
        if last_partial {
            // O_DIRECT offsets must stay aligned: only the final block may be short.
            return Err(ConvertError::Invalid(format!(
                "internal: a short block before the end of {}",
                path.display()
            )));
        }
        last_partial = b.len < b.cap;
        h.update(b.as_slice());
        let at = n;
        n += b.len as u64;
        hashed.send((at, b)).map_err(|_| stopped())?;
    }
    Ok((h.finalize(), n))
}

/// One writer: takes blocks off the shared queue until it is closed; returns the bytes it wrote.
fn write_stage(
    out: &File,
    path: &Path,
    direct: bool,
    hashed: &Mutex<Receiver<(u64, AlignedBuf)>>,
    free: SyncSender<AlignedBuf>,
) -> Result<u64> {
    let mut total = 0u64;
    loop {
        // The lock is held only while waiting for the next block, not during the write.
        let next = hashed.lock().map_err(|_| stopped())?.recv();
        let Ok((pos, mut b)) = next else {
            return Ok(total);
        };
        let len = b.len;
        let end = if direct {
            // Pad to the alignment with zeros (already hashed without them); `run` cuts the
            // file back to its real length.
            let padded = len.div_ceil(ALIGN) * ALIGN;
            b.whole_mut()[len..padded].fill(0);
            padded
        } else {
            len
        };
        out.write_all_at(&b.whole_mut()[..end], pos)
            .map_err(|e| ConvertError::io(path, e))?;
        total += len as u64;
        // The producer may be done already and have dropped its receiver: nothing to return to.
        let _ = free.send(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces of awkward sizes across block boundaries, through a direct (where the filesystem
    /// allows it) or buffered file: the bytes and digest match the input exactly.
    #[test]
    fn pipeline_writes_and_hashes_every_byte_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src.bin");
        let src_bytes: Vec<u8> = (0..(3 * BLOCK + 12345))
            .map(|i| (i * 7 + i / 4099) as u8)
            .collect();
        std::fs::write(&src_path, &src_bytes).unwrap();
        let src = File::open(&src_path).unwrap();
        for direct in [false, true] {
            let path = dir.path().join(format!("out-{direct}"));
            let out = if direct {
                use std::os::unix::fs::OpenOptionsExt;
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)
                {
                    Ok(f) => f,
                    // tmpfs and some others refuse O_DIRECT; the buffered case still runs.
                    Err(_) => continue,
                }
            } else {
                File::create(&path).unwrap()
            };
            let mut want = Vec::new();
            let o = run(&out, &path, direct, |s| {
                s.write(b"header")?;
                want.extend_from_slice(b"header");
                // Unaligned reads and writes that straddle block ends.
                for (at, n) in [(5usize, BLOCK - 3), (17, 2 * BLOCK + 11), (0, 1), (9, 4097)] {
                    s.read_from(&src, at as u64, n, &|_, _, e| {
                        ConvertError::io(&src_path, e)
                    })?;
                    want.extend_from_slice(&src_bytes[at..at + n]);
                }
                s.write(&[1, 2, 3])?;
                want.extend_from_slice(&[1, 2, 3]);
                Ok(())
            })
            .unwrap();
            drop(out);
            let got = std::fs::read(&path).unwrap();
            assert_eq!(o.size, want.len() as u64);
            assert!(got == want, "file bytes differ (direct={direct})");
            assert_eq!(o.sha256, Sha256::digest(&want));
        }
    }

    /// A producer error stops the pipeline and is the error reported.
    #[test]
    fn producer_error_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o");
        let out = File::create(&path).unwrap();
        let err = run(&out, &path, false, |s| {
            s.write(&vec![0u8; 3 * BLOCK])?;
            Err(ConvertError::Invalid("boom from the reader".into()))
        })
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("boom from the reader"), "{err}");
    }

    /// A writer error (here: a file opened read-only) is reported, not the producer's
    /// "stage stopped" that it causes.
    #[test]
    fn writer_error_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::write(&path, b"").unwrap();
        let out = File::open(&path).unwrap();
        let err = run(&out, &path, false, |s| s.write(&vec![0u8; 10 * BLOCK]))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("I/O error on") && err.contains("ro"), "{err}");
    }
}
