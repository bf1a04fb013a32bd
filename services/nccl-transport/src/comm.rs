//! One NCCL communicator in non-blocking mode, owned by the thread that created it. Hand-written
//! over cudarc's `nccl::sys` because cudarc's safe `Comm` only inits in blocking mode, which can
//! neither time out nor be aborted while a rank is missing. Every wait polls the stream and
//! `ncclCommGetAsyncError` against a deadline and aborts the communicator when it passes, so a
//! dead peer becomes an error, not a hang (the watchdog pattern PyTorch's ProcessGroupNCCL uses).

use std::ffi::CStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cudarc::driver::CudaStream;
use cudarc::driver::sys as cu;
use cudarc::nccl::sys as nc;

use crate::error::{NcclError, Result, cuda};

/// The 128-byte `ncclUniqueId` the router creates and sends to every shard.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId(pub [u8; 128]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UniqueId(..)")
    }
}

impl UniqueId {
    /// A fresh id (rank 0 only). Needs libnccl.
    pub fn new() -> Result<Self> {
        if !crate::nccl_available() {
            return Err(NcclError::Unavailable(
                "libcuda / libnccl could not be loaded".into(),
            ));
        }
        let mut id = nc::ncclUniqueId { internal: [0; 128] };
        // SAFETY: id is a valid out-pointer of the right type.
        let r = unsafe { nc::ncclGetUniqueId(&mut id) };
        check(r, "ncclGetUniqueId", 0, None)?;
        Ok(UniqueId(id.internal.map(|c| c as u8)))
    }

    /// The id from its wire bytes (exactly 128).
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let a: [u8; 128] = b.try_into().map_err(|_| {
            NcclError::InvalidArgument(format!("unique_id has {} bytes, expected 128", b.len()))
        })?;
        Ok(UniqueId(a))
    }

    fn raw(&self) -> nc::ncclUniqueId {
        nc::ncclUniqueId {
            internal: self.0.map(|b| b as core::ffi::c_char),
        }
    }
}

/// ncclConfig_t as of NCCL 2.28 (the host's library, GPU.md). NCCL reads only the fields of the
/// `version` we declare, so a newer library accepts it; unset fields hold NCCL's "undefined"
/// markers (INT_MIN / NULL), exactly what NCCL_CONFIG_INITIALIZER does.
#[repr(C)]
struct ConfigV22800 {
    size: usize,
    magic: u32,
    version: u32,
    blocking: i32,
    cga_cluster_size: i32,
    min_ctas: i32,
    max_ctas: i32,
    net_name: *const core::ffi::c_char,
    split_share: i32,
    traffic_class: i32,
    comm_name: *const core::ffi::c_char,
    collnet_enable: i32,
    cta_policy: i32,
    shrink_share: i32,
    nvls_ctas: i32,
    n_channels_per_net_peer: i32,
    nvlink_centric_sched: i32,
}

const UNDEF: i32 = i32::MIN;

impl ConfigV22800 {
    fn blocking() -> Self {
        ConfigV22800 {
            blocking: 1,
            ..Self::non_blocking()
        }
    }

    fn non_blocking() -> Self {
        ConfigV22800 {
            size: std::mem::size_of::<Self>(),
            magic: 0xcafe_beef,
            version: 22800,
            blocking: 0,
            cga_cluster_size: UNDEF,
            min_ctas: UNDEF,
            max_ctas: UNDEF,
            net_name: std::ptr::null(),
            split_share: UNDEF,
            traffic_class: UNDEF,
            comm_name: std::ptr::null(),
            collnet_enable: UNDEF,
            cta_policy: UNDEF,
            shrink_share: UNDEF,
            nvls_ctas: UNDEF,
            n_channels_per_net_peer: UNDEF,
            nvlink_centric_sched: UNDEF,
        }
    }
}

fn error_string(r: nc::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any result code.
    unsafe {
        let p = nc::ncclGetErrorString(r);
        if p.is_null() {
            format!("{r:?}")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

fn last_error(comm: Option<nc::ncclComm_t>) -> String {
    // SAFETY: ncclGetLastError accepts NULL or a live communicator and returns a NUL-terminated
    // string owned by NCCL.
    unsafe {
        let p = nc::ncclGetLastError(comm.unwrap_or(std::ptr::null_mut()));
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

fn check(
    r: nc::ncclResult_t,
    op: &'static str,
    rank: usize,
    comm: Option<nc::ncclComm_t>,
) -> Result<bool> {
    match r {
        nc::ncclResult_t::ncclSuccess => Ok(false),
        nc::ncclResult_t::ncclInProgress => Ok(true),
        other => Err(NcclError::Nccl {
            op,
            rank,
            code: error_string(other),
            detail: last_error(comm),
        }),
    }
}

/// A communicator in non-blocking mode; aborted when dropped (like cudarc's `Comm`).
pub struct Comm {
    raw: nc::ncclComm_t,
    /// The non-blocking communicator this one was split from ([`Comm::into_blocking`]): kept
    /// (and aborted with this one) because destroying it would be a collective call.
    parent: Option<nc::ncclComm_t>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    dead: Option<String>,
}

/// How a wait ends early: a caller-owned flag (e.g. shard shutdown) is checked while waiting.
pub type StopFlag = Arc<AtomicBool>;

impl Comm {
    /// Joins the communicator of `world` ranks as `rank`, on `stream`'s device, waiting at most
    /// `timeout` for all ranks. Collective: every rank must call it with the same id.
    pub fn init(
        stream: Arc<CudaStream>,
        id: UniqueId,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self> {
        if !crate::nccl_available() {
            return Err(NcclError::Unavailable(
                "libcuda / libnccl could not be loaded".into(),
            ));
        }
        if world == 0 || rank >= world {
            return Err(NcclError::InvalidArgument(format!(
                "rank {rank} of world {world}"
            )));
        }
        let (r32, w32) = (
            i32::try_from(rank).map_err(|_| NcclError::InvalidArgument("rank".into()))?,
            i32::try_from(world).map_err(|_| NcclError::InvalidArgument("world".into()))?,
        );
        // NCCL picks the device from the calling thread's current context.
        stream
            .context()
            .bind_to_thread()
            .map_err(cuda("bind context"))?;
        let mut cfg = ConfigV22800::non_blocking();
        let mut raw: nc::ncclComm_t = std::ptr::null_mut();
        // SAFETY: raw is a valid out-pointer; cfg has the layout of ncclConfig_t for the version
        // it declares and outlives the call (NCCL copies it).
        let r = unsafe {
            nc::ncclCommInitRankConfig(
                &mut raw,
                w32,
                id.raw(),
                r32,
                (&mut cfg as *mut ConfigV22800).cast::<nc::ncclConfig_t>(),
            )
        };
        if let Err(e) = check(r, "ncclCommInitRankConfig", rank, None) {
            if !raw.is_null() {
                // SAFETY: raw came from ncclCommInitRankConfig and is not used afterwards.
                unsafe { nc::ncclCommAbort(raw) };
            }
            return Err(e);
        }
        let mut comm = Comm {
            raw,
            parent: None,
            stream,
            rank,
            world,
            dead: None,
        };
        comm.settle("ncclCommInitRankConfig", Instant::now() + timeout, timeout)?;
        Ok(comm)
    }

    /// Polls until NCCL no longer reports `op` in progress on this communicator; at `deadline`
    /// aborts it and fails with `InitTimeout` (`timeout` is what the error reports).
    fn settle(&mut self, op: &'static str, deadline: Instant, timeout: Duration) -> Result<()> {
        while self.async_state(op)? {
            if Instant::now() >= deadline {
                self.abort(&format!("{op} timed out"));
                return Err(NcclError::InitTimeout {
                    rank: self.rank,
                    world: self.world,
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `Ok(true)` while an operation is still in progress; an error once the communicator failed.
    fn async_state(&mut self, op: &'static str) -> Result<bool> {
        let mut st = nc::ncclResult_t::ncclSuccess;
        // SAFETY: raw is a live communicator; st is a valid out-pointer.
        let r = unsafe { nc::ncclCommGetAsyncError(self.raw, &mut st) };
        let res = check(r, op, self.rank, Some(self.raw))
            .and_then(|_| check(st, op, self.rank, Some(self.raw)));
        if let Err(e) = &res {
            self.abort(&e.to_string());
        }
        res
    }

    fn alive(&self) -> Result<()> {
        match &self.dead {
            Some(reason) => Err(NcclError::Aborted {
                rank: self.rank,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Aborts the communicator (unblocks its kernels); every later call fails with `Aborted`.
    pub fn abort(&mut self, reason: &str) {
        if self.dead.is_none() {
            self.dead = Some(reason.to_string());
            // SAFETY: raw (and parent) are live and never used again for NCCL work after this.
            unsafe {
                nc::ncclCommAbort(self.raw);
                if let Some(p) = self.parent.take() {
                    nc::ncclCommAbort(p);
                }
            }
        }
    }

    /// The same ranks as a blocking-mode communicator (collective: every rank calls it after
    /// `init`). Why: in non-blocking mode every `ncclGroupEnd` hands the launch to a new NCCL
    /// thread, which costs ~50-60 µs of host time per group on the H200 host (bench/RESULTS.md,
    /// `DSV2_NCCL_TRACE`), three groups per MoE layer. The split waits at most `timeout` when the
    /// parent reports it in progress; a rank that dies during the split itself is not detected
    /// (the blocking call would wait), which is why it is opt-in (`DSV2_NCCL_BLOCKING=1`).
    pub fn into_blocking(mut self, timeout: Duration) -> Result<Comm> {
        self.alive()?;
        let key =
            i32::try_from(self.rank).map_err(|_| NcclError::InvalidArgument("rank".into()))?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(cuda("bind context"))?;
        let mut cfg = ConfigV22800::blocking();
        let mut child: nc::ncclComm_t = std::ptr::null_mut();
        // SAFETY: raw is live; child is a valid out-pointer; cfg has ncclConfig_t's layout for
        // its declared version and outlives the call.
        let r = unsafe {
            nc::ncclCommSplit(
                self.raw,
                0,
                key,
                &mut child,
                (&mut cfg as *mut ConfigV22800).cast::<nc::ncclConfig_t>(),
            )
        };
        check(r, "ncclCommSplit", self.rank, Some(self.raw))?;
        // A non-blocking parent finishes the split in the background and writes the child
        // handle only then (the first GPU run read it right away and found it NULL): wait on
        // the parent's state first.
        let deadline = Instant::now() + timeout;
        self.settle("ncclCommSplit", deadline, timeout)?;
        // NCCL's background thread wrote it through the pointer it was given: read it back
        // from memory, not from a value the compiler may have kept from before the wait
        // SAFETY: `child` is a live, initialised local.
        let child = unsafe { std::ptr::read_volatile(&child) };
        if child.is_null() {
            return Err(NcclError::Nccl {
                op: "ncclCommSplit",
                rank: self.rank,
                code: "no communicator".into(),
                detail: last_error(Some(self.raw)),
            });
        }
        let parent = std::mem::replace(&mut self.raw, child);
        self.parent = Some(parent);
        // the child is blocking, but its own setup may still report in progress once
        self.settle("ncclCommSplit (child)", deadline, timeout)?;
        Ok(self)
    }

    /// Opens a group (sends and recvs until `group_end` are issued together).
    pub fn group_start(&self) -> Result<()> {
        self.alive()?;
        // SAFETY: plain call; NCCL tracks the group per thread.
        check(
            unsafe { nc::ncclGroupStart() },
            "ncclGroupStart",
            self.rank,
            None,
        )
        .map(|_| ())
    }

    /// Closes the group and waits until NCCL has enqueued it (non-blocking mode may defer it).
    pub fn group_end(&mut self, timeout: Duration) -> Result<()> {
        // SAFETY: plain call closing the group opened by group_start on this thread.
        let r = unsafe { nc::ncclGroupEnd() };
        let mut pending = check(r, "ncclGroupEnd", self.rank, Some(self.raw))?;
        let deadline = Instant::now() + timeout;
        while pending {
            pending = self.async_state("ncclGroupEnd")?;
            if pending && Instant::now() >= deadline {
                self.abort("ncclGroupEnd timed out");
                return Err(NcclError::Timeout {
                    op: "ncclGroupEnd",
                    rank: self.rank,
                    timeout,
                    what: "enqueueing the group".into(),
                });
            }
        }
        Ok(())
    }

    /// Enqueues a send of `bytes` bytes at device address `ptr` to `peer`.
    ///
    /// # Safety
    /// `ptr .. ptr + bytes` must be device memory of this communicator's device that stays valid
    /// and unmodified until the stream has passed this operation.
    pub unsafe fn send_raw(&self, ptr: u64, bytes: usize, peer: usize) -> Result<()> {
        self.alive()?;
        // SAFETY: the caller guarantees the buffer; stream is this communicator's stream.
        let r = unsafe {
            nc::ncclSend(
                ptr as *const core::ffi::c_void,
                bytes,
                nc::ncclDataType_t::ncclUint8,
                peer as i32,
                self.raw,
                self.stream.cu_stream() as nc::cudaStream_t,
            )
        };
        check(r, "ncclSend", self.rank, Some(self.raw)).map(|_| ())
    }

    /// Enqueues a receive of `bytes` bytes from `peer` into device address `ptr`.
    ///
    /// # Safety
    /// `ptr .. ptr + bytes` must be device memory of this communicator's device, valid and not
    /// otherwise accessed until the stream has passed this operation.
    pub unsafe fn recv_raw(&self, ptr: u64, bytes: usize, peer: usize) -> Result<()> {
        self.alive()?;
        // SAFETY: as for send_raw.
        let r = unsafe {
            nc::ncclRecv(
                ptr as *mut core::ffi::c_void,
                bytes,
                nc::ncclDataType_t::ncclUint8,
                peer as i32,
                self.raw,
                self.stream.cu_stream() as nc::cudaStream_t,
            )
        };
        check(r, "ncclRecv", self.rank, Some(self.raw)).map(|_| ())
    }

    /// Waits until everything enqueued on the stream so far has run, polling the stream and the
    /// communicator's async error. `timeout` None waits until `stop` is set (idle shard);
    /// on timeout or error the communicator is aborted.
    pub fn wait(
        &mut self,
        op: &'static str,
        timeout: Option<Duration>,
        stop: Option<&StopFlag>,
    ) -> Result<()> {
        let stream = self.stream.cu_stream();
        // SAFETY: the stream handle is live for the lifetime of self.stream.
        self.poll(op, timeout, stop, "cuStreamQuery", || unsafe {
            cu::cuStreamQuery(stream)
        })
    }

    /// [`Comm::wait`] for the stream to pass `event` only (recorded on it), not for the work
    /// enqueued after it.
    pub fn wait_event(
        &mut self,
        op: &'static str,
        event: &Event,
        timeout: Option<Duration>,
        stop: Option<&StopFlag>,
    ) -> Result<()> {
        let ev = event.0;
        // SAFETY: the event is live as long as `event`, which outlives this call.
        self.poll(op, timeout, stop, "cuEventQuery", || unsafe {
            cu::cuEventQuery(ev)
        })
    }

    fn poll(
        &mut self,
        op: &'static str,
        timeout: Option<Duration>,
        stop: Option<&StopFlag>,
        query_name: &'static str,
        query: impl Fn() -> cu::CUresult,
    ) -> Result<()> {
        self.alive()?;
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            match query() {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    let e = NcclError::Cuda {
                        op: query_name,
                        source: cudarc::driver::DriverError(other),
                    };
                    self.abort(&e.to_string());
                    return Err(e);
                }
            }
            spins = spins.wrapping_add(1);
            // The async-error poll and the clock cost ~100 ns: do them every 64 spins.
            if spins.is_multiple_of(64) {
                self.async_state(op)?;
                let waited = start.elapsed();
                if let Some(t) = timeout
                    && waited >= t
                {
                    self.abort(&format!("{op} timed out"));
                    return Err(NcclError::Timeout {
                        op,
                        rank: self.rank,
                        timeout: t,
                        what: "a peer did not send or receive its part".into(),
                    });
                }
                if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                    self.abort("stopped");
                    return Err(NcclError::Aborted {
                        rank: self.rank,
                        reason: "stopped by its owner".into(),
                    });
                }
                // Long idle waits (a shard between forward passes) should not burn a core.
                if waited > Duration::from_millis(2) {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            std::hint::spin_loop();
        }
    }
}

/// A CUDA event (no timing) to wait for one point of a stream: a shard waits for a slot's
/// header to arrive while the compute and reply it enqueued behind it go on.
pub struct Event(cu::CUevent);

impl Event {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        stream
            .context()
            .bind_to_thread()
            .map_err(cuda("bind context"))?;
        let mut ev: cu::CUevent = std::ptr::null_mut();
        // SAFETY: ev is a valid out-pointer.
        let r = unsafe {
            cu::cuEventCreate(
                &mut ev,
                cu::CUevent_flags_enum::CU_EVENT_DISABLE_TIMING as core::ffi::c_uint,
            )
        };
        drv(r, "cuEventCreate")?;
        Ok(Event(ev))
    }

    /// Marks the current end of `stream`'s work.
    pub fn record(&self, stream: &CudaStream) -> Result<()> {
        // SAFETY: both handles are live.
        drv(
            unsafe { cu::cuEventRecord(self.0, stream.cu_stream()) },
            "cuEventRecord",
        )
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by cuEventCreate, destroyed once.
        unsafe { cu::cuEventDestroy_v2(self.0) };
    }
}

/// Device-side helpers the plane enqueues on its stream (raw addresses, like NCCL's buffers).
///
/// # Safety
/// Every address must be live device memory of the stream's device, with room for the bytes
/// or words named, until the stream has passed the operation.
pub(crate) unsafe fn copy_dtod(
    stream: &CudaStream,
    dst: u64,
    src: u64,
    bytes: usize,
) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: per the function's contract.
    drv(
        unsafe { cu::cuMemcpyDtoDAsync_v2(dst, src, bytes, stream.cu_stream()) },
        "cuMemcpyDtoDAsync",
    )
}

/// # Safety
/// As [`copy_dtod`]: `dst` holds `words` u32.
pub(crate) unsafe fn fill_u32(
    stream: &CudaStream,
    dst: u64,
    value: u32,
    words: usize,
) -> Result<()> {
    if words == 0 {
        return Ok(());
    }
    // SAFETY: per the function's contract.
    drv(
        unsafe { cu::cuMemsetD32Async(dst, value, words, stream.cu_stream()) },
        "cuMemsetD32Async",
    )
}

impl Drop for Comm {
    fn drop(&mut self) {
        if self.dead.is_none() {
            // SAFETY: raw (and parent) are live and not used after drop.
            unsafe {
                nc::ncclCommAbort(self.raw);
                if let Some(p) = self.parent.take() {
                    nc::ncclCommAbort(p);
                }
            }
        }
    }
}

/// Page-locked host memory for the small header copies (async copies need it).
pub(crate) struct Pinned {
    ptr: *mut u32,
    words: usize,
}

impl Pinned {
    pub(crate) fn new(stream: &Arc<CudaStream>, words: usize) -> Result<Self> {
        stream
            .context()
            .bind_to_thread()
            .map_err(cuda("bind context"))?;
        let mut p: *mut core::ffi::c_void = std::ptr::null_mut();
        // SAFETY: p is a valid out-pointer; the size is non-zero.
        let r = unsafe { cu::cuMemAllocHost_v2(&mut p, words.max(1) * 4) };
        if r != cu::CUresult::CUDA_SUCCESS {
            return Err(NcclError::Cuda {
                op: "cuMemAllocHost",
                source: cudarc::driver::DriverError(r),
            });
        }
        // SAFETY: freshly allocated, words * 4 bytes, u32-aligned (page-aligned).
        unsafe { std::ptr::write_bytes(p.cast::<u32>(), 0, words) };
        Ok(Pinned {
            ptr: p.cast(),
            words,
        })
    }

    pub(crate) fn slice_mut(&mut self) -> &mut [u32] {
        // SAFETY: ptr holds `words` initialised u32 and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.words) }
    }

    pub(crate) fn slice(&self) -> &[u32] {
        // SAFETY: as above, shared.
        unsafe { std::slice::from_raw_parts(self.ptr, self.words) }
    }

    /// Async copy host -> device of `words` u32 at `dst`.
    pub(crate) fn htod(&self, stream: &CudaStream, dst: u64, words: usize) -> Result<()> {
        // SAFETY: self holds >= words u32; dst is a device buffer of >= words u32 (caller).
        let r = unsafe {
            cu::cuMemcpyHtoDAsync_v2(dst, self.ptr.cast(), words * 4, stream.cu_stream())
        };
        drv(r, "cuMemcpyHtoDAsync")
    }

    /// Async copy host -> device of `words` u32 starting at word `from` of this buffer.
    pub(crate) fn htod_from(
        &self,
        stream: &CudaStream,
        from: usize,
        dst: u64,
        words: usize,
    ) -> Result<()> {
        if from + words > self.words {
            return Err(NcclError::InvalidArgument(format!(
                "pinned words {from}..{} of {}",
                from + words,
                self.words
            )));
        }
        // SAFETY: from + words is within the buffer (checked); dst per the caller.
        let r = unsafe {
            cu::cuMemcpyHtoDAsync_v2(
                dst,
                self.ptr.add(from).cast(),
                words * 4,
                stream.cu_stream(),
            )
        };
        drv(r, "cuMemcpyHtoDAsync")
    }

    /// Async copy device -> host of `words` u32 from `src`.
    pub(crate) fn dtoh(&mut self, stream: &CudaStream, src: u64, words: usize) -> Result<()> {
        // SAFETY: as above, the other direction.
        let r = unsafe {
            cu::cuMemcpyDtoHAsync_v2(self.ptr.cast(), src, words * 4, stream.cu_stream())
        };
        drv(r, "cuMemcpyDtoHAsync")
    }
}

fn drv(r: cu::CUresult, op: &'static str) -> Result<()> {
    if r == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(NcclError::Cuda {
            op,
            source: cudarc::driver::DriverError(r),
        })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: ptr came from cuMemAllocHost and is freed once.
        unsafe { cu::cuMemFreeHost(self.ptr.cast()) };
    }
}
