//! Datagrams in batches: recvmmsg(2) and sendmmsg(2) on UDP sockets, so that a busy
//! relay moves up to [`BATCH`] datagrams per system call instead of one. The sockets
//! themselves are std's `UdpSocket` (bound, close-on-exec, made non-blocking by the
//! caller); only these two calls need wrappers of their own.

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::unix::io::RawFd;

use crate::sys;

/// The most datagrams one call moves.
pub const BATCH: usize = 16;

/// One datagram that [`recv_batch`] received.
#[derive(Clone, Copy, Debug, Default)]
pub struct Received {
    /// Its length (at most the buffer's room).
    pub len: usize,
    /// Its source, None for a family we do not know.
    pub from: Option<SocketAddr>,
    /// It was longer than the buffer and was cut (MSG_TRUNC).
    pub truncated: bool,
}

/// Receives up to `min(bufs.len(), meta.len(), BATCH)` datagrams without blocking, the
/// i-th into `bufs[i][offset..]`, and describes each in `meta[i]`. Ok(0) when none was
/// waiting.
pub fn recv_batch(
    fd: RawFd,
    bufs: &mut [Vec<u8>],
    offset: usize,
    meta: &mut [Received],
) -> io::Result<usize> {
    let n = bufs.len().min(meta.len()).min(BATCH);
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: all-zero is a valid value of these plain C structs (null pointers).
    let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        let room = bufs[i].get_mut(offset..).unwrap_or_default();
        iovs[i] = libc::iovec {
            iov_base: room.as_mut_ptr().cast(),
            iov_len: room.len(),
        };
        msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
        msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    let got = sys::retry(|| {
        // SAFETY: msgs[..n] point to iovecs over buffers we own and borrow mutably for
        // the call, and to sockaddr_storage of ours of the size given; the kernel writes
        // within them. No timeout pointer: MSG_DONTWAIT returns at once.
        sys::cvt(unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        })
    });
    let got = match got {
        Ok(k) => k as usize,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
        Err(e) => return Err(e),
    };
    for i in 0..got {
        meta[i] = Received {
            len: (msgs[i].msg_len as usize).min(iovs[i].iov_len),
            from: sys::sockaddr_to_std(&addrs[i]),
            truncated: msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        };
    }
    Ok(got)
}

/// Sends the first of `msgs` (at most [`BATCH`]), each to its address, without
/// blocking. Ok(k): the first k went (k ≥ 1 when `msgs` is not empty); Err: the first
/// could not be sent, for that reason (the caller drops it and goes on with the rest).
pub fn send_batch(fd: RawFd, msgs: &[(&[u8], SocketAddr)]) -> io::Result<usize> {
    let n = msgs.len().min(BATCH);
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: all-zero is a valid value of these plain C structs (null pointers).
    let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (i, (data, to)) in msgs.iter().take(n).enumerate() {
        let (ss, len) = sys::std_to_sockaddr(to);
        addrs[i] = ss;
        iovs[i] = libc::iovec {
            // The kernel only reads through it (sendmmsg).
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        hdrs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
        hdrs[i].msg_hdr.msg_namelen = len;
        hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    let sent = sys::retry(|| {
        // SAFETY: hdrs[..n] point to iovecs over the callers' slices, which outlive the
        // call and which the kernel only reads, and to addresses of ours of the lengths
        // given.
        sys::cvt(unsafe {
            libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT)
        })
    })?;
    Ok(sent as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn batches_go_and_come_whole_with_their_sources() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let a = vec![1u8; 1];
        let b = vec![2u8; 60000];
        let c = vec![3u8; 700];
        let msgs = [(&a[..], to), (&b[..], to), (&c[..], to)];
        assert_eq!(send_batch(tx.as_raw_fd(), &msgs).unwrap(), 3);
        let mut bufs = vec![vec![0u8; 8 + 65536]; 4];
        let mut meta = [Received::default(); 4];
        let mut got = 0;
        for _ in 0..100 {
            got += recv_batch(rx.as_raw_fd(), &mut bufs[got..], 8, &mut meta[got..]).unwrap();
            if got == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got, 3);
        for (i, want) in [&a, &b, &c].iter().enumerate() {
            assert_eq!(meta[i].len, want.len());
            assert_eq!(&bufs[i][8..8 + meta[i].len], &want[..]);
            assert_eq!(meta[i].from, Some(tx.local_addr().unwrap()));
            assert!(!meta[i].truncated);
        }
        assert_eq!(
            recv_batch(rx.as_raw_fd(), &mut bufs, 0, &mut meta).unwrap(),
            0
        );
        // Too long for its buffer: cut, and said so.
        assert_eq!(send_batch(tx.as_raw_fd(), &msgs[1..2]).unwrap(), 1);
        let mut small = vec![vec![0u8; 100]];
        for _ in 0..100 {
            if recv_batch(rx.as_raw_fd(), &mut small, 0, &mut meta).unwrap() == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(meta[0].truncated);
        assert_eq!(meta[0].len, 100);
    }
}
