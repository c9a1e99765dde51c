//! Rewrites the HTTP/2 `:authority` of Workload API requests before the gRPC server sees them.
//!
//! The Workload API is served over a Unix socket, where the authority means nothing, and clients
//! disagree on what to send: Rust and Go clients send `localhost`, while gRPC core (Python, Ruby,
//! C++) and some Java clients send the socket path, percent-encoded (`%2Ftmp%2Fagent.sock`).
//! The `h2` crate validates `:authority` as a URI authority, finds `%` in the host, and resets the
//! stream with `RST_STREAM(PROTOCOL_ERROR)` before tonic ever sees the request. No `h2` or hyper
//! setting relaxes that check, so [`NormalizeAuthority`] sits between the socket and the server
//! and rewrites the pseudo-header on the wire.
//!
//! The rewrite is done by decoding every client header block with HPACK (RFC 7541) and encoding
//! it again with literals that never touch the dynamic table. HPACK is stateful per connection,
//! so the filter has to see every header block from the first byte on; anything it does not
//! understand makes it step aside for the rest of the connection and hand the bytes to `h2`
//! unchanged, so that `h2` reports the protocol error itself.

use std::fmt;
use std::io;
use std::mem;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Every frame starts with a 9-byte header (RFC 9113 §4.1).
const FRAME_HEADER_LEN: usize = 9;

const FRAME_HEADERS: u8 = 0x1;
const FRAME_PUSH_PROMISE: u8 = 0x5;
const FRAME_CONTINUATION: u8 = 0x9;

const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Stream dependency (4 bytes) and weight (1 byte) of a HEADERS frame with PRIORITY.
const PRIORITY_LEN: usize = 5;

/// The largest frame payload every peer must accept (the default SETTINGS_MAX_FRAME_SIZE).
/// Re-encoded blocks are cut at this size so that they are legal whatever the server advertised.
const MAX_OUTPUT_FRAME_PAYLOAD: usize = 16_384;

/// Largest header block (frames as received, headers included) the filter buffers. A client
/// that sends more is passed through untouched, so that `h2` applies its own, smaller, header
/// list limit and answers with its usual error.
const MAX_HEADER_BLOCK: usize = 1 << 20;

/// Largest HPACK dynamic table the filter's decoder accepts. The client may only grow its table
/// past 4096 bytes if the server advertised a larger SETTINGS_HEADER_TABLE_SIZE, which `h2`
/// does not do by default; the filter does not read the server's settings, so it is generous.
const MAX_DYNAMIC_TABLE_SIZE: usize = 65_536;

/// Size of the buffer bytes are read into when they have to be inspected.
const READ_CHUNK: usize = 16 * 1024;

/// Once drained, an output buffer larger than this is shrunk back, so that one large header block
/// does not pin a megabyte for the life of a long-lived connection.
const RETAINED_OUTPUT_CAPACITY: usize = 64 * 1024;

/// Wraps the server side of an accepted connection. Bytes written pass through untouched.
/// Bytes read are parsed as the client half of an HTTP/2 connection: the connection preface,
/// then frames. Every header block (HEADERS + CONTINUATION frames of one stream) is decoded
/// with HPACK, its `:authority` replaced by the given value (added nowhere if absent), and
/// re-encoded. All other frames pass through unchanged.
///
/// Re-encoded header blocks use only static-table indexes and literals without indexing, so the
/// server's HPACK decoder never gains dynamic-table entries and stays in step whatever the client
/// did with its own table. A field the client marked "never indexed" loses that mark; the mark
/// only guides intermediaries, and the server is the last hop.
///
/// If the bytes are not HTTP/2 (wrong preface) or a frame is malformed, the wrapper stops
/// filtering and passes every byte from there on through unchanged, so the server rejects the
/// connection with its own error. It never panics on input and reads from the inner stream only
/// when it has nothing to return.
///
/// Use one wrapper per accepted connection, from its first byte: the HPACK state of a connection
/// cannot be picked up in the middle.
pub struct NormalizeAuthority<S> {
    inner: S,
    filter: Filter,
    /// Bytes read from `inner` that still have to go through `filter`. Allocated on first use.
    scratch: Vec<u8>,
    /// `inner` reported end of stream.
    eof: bool,
}

impl<S> NormalizeAuthority<S> {
    /// Wraps `inner`, the server side of a freshly accepted connection, so that every request
    /// read from it carries `authority` as its `:authority`.
    ///
    /// `authority` must itself be a valid URI authority (for the Workload API: `localhost`),
    /// or the server rejects every request instead of some.
    pub fn new(inner: S, authority: &'static str) -> Self {
        Self {
            inner,
            filter: Filter::new(authority),
            scratch: Vec::new(),
            eof: false,
        }
    }

    /// The wrapped stream, for example to read the peer's credentials.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the stream. Bytes already read from it but not yet returned to the reader are
    /// lost, so only call this when the connection is finished or before anything was read.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for NormalizeAuthority<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NormalizeAuthority")
            .field("inner", &self.inner)
            .field("authority", &self.filter.authority)
            .field("filtering", &!matches!(self.filter.state, State::Passthrough))
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for NormalizeAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.filter.has_output() {
                this.filter.drain_into(buf);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match this.filter.verbatim_len() {
                Verbatim::All => return Pin::new(&mut this.inner).poll_read(cx, buf),
                Verbatim::Upto(len) if len > 0 => {
                    // The rest of a DATA (or other untouched) frame: read it straight into the
                    // caller's buffer instead of copying it through ours.
                    let want = len.min(buf.remaining());
                    let mut direct = ReadBuf::new(buf.initialize_unfilled_to(want));
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                    let got = direct.filled().len();
                    if got == 0 {
                        this.eof = true;
                        this.filter.finish();
                        continue;
                    }
                    buf.advance(got);
                    this.filter.skip_verbatim(got);
                    return Poll::Ready(Ok(()));
                }
                Verbatim::Upto(_) => {}
            }
            if this.scratch.is_empty() {
                this.scratch = vec![0; READ_CHUNK];
            }
            let mut chunk = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
            let read = chunk.filled();
            if read.is_empty() {
                this.eof = true;
                this.filter.finish();
            } else {
                // May produce no output (half a frame header): then loop and read more, since
                // returning nothing would read as end of stream.
                this.filter.push(read);
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for NormalizeAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How many of the next input bytes the filter would copy unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verbatim {
    /// Every byte, to the end of the connection.
    All,
    /// This many; zero when the next bytes must be inspected.
    Upto(usize),
}

/// Why the filter stopped rewriting a connection. Only logged: the bytes go to `h2`, which
/// produces the error the client sees.
#[derive(Debug, thiserror::Error)]
enum Bypass {
    /// The first bytes are not the HTTP/2 client preface.
    #[error("input is not an HTTP/2 client connection preface")]
    NotHttp2,
    /// A frame that opens or continues a header block breaks RFC 9113's framing rules.
    #[error("malformed {frame} frame on stream {stream_id}: {problem}")]
    MalformedFrame {
        /// The frame type, by name.
        frame: &'static str,
        /// The frame's stream identifier.
        stream_id: u32,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A header block grew past [`MAX_HEADER_BLOCK`].
    #[error("header block on stream {stream_id} exceeds {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge {
        /// The stream the block belongs to.
        stream_id: u32,
    },
    /// The HPACK decoder rejected a header block.
    #[error("HPACK decoding failed on stream {stream_id}: {source}")]
    Hpack {
        /// The stream the block belongs to.
        stream_id: u32,
        /// The decoder's error.
        source: loona_hpack::decoder::DecoderError,
    },
    /// The connection ended in the middle of a frame.
    #[error("connection ended inside a frame")]
    Truncated,
}

/// A parsed frame header (RFC 9113 §4.1).
#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream_id: u32,
}

impl FrameHeader {
    fn parse(bytes: &[u8; FRAME_HEADER_LEN]) -> Self {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        // The top bit is reserved and must be ignored on receipt.
        let stream_id =
            u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
        Self {
            len,
            kind: bytes[3],
            flags: bytes[4],
            stream_id,
        }
    }
}

/// A header block being collected: the HEADERS frame and any CONTINUATION frames so far.
struct HeaderBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    /// Every byte of the block's frames as received, replayed if the filter gives up.
    raw: Vec<u8>,
    /// HPACK fragments of the completed frames, concatenated; empty while the block is one frame.
    fragment: Vec<u8>,
    /// The frame currently being read, and where it starts in `raw`.
    frame: FrameHeader,
    frame_start: usize,
}

/// Where the filter is in the client's byte stream.
enum State {
    /// Checking the connection preface; matched bytes have already been emitted.
    Preface { matched: usize },
    /// Reading a frame header, possibly in the middle of a header block (`open`).
    FrameHeader {
        bytes: [u8; FRAME_HEADER_LEN],
        filled: usize,
        open: Option<HeaderBlock>,
    },
    /// Copying the payload of a frame that is not part of a header block.
    Forward { remaining: usize },
    /// Reading the payload of a HEADERS or CONTINUATION frame into `block.raw`.
    Collect { block: HeaderBlock, remaining: usize },
    /// Not filtering: every byte is copied.
    Passthrough,
}

/// The I/O-free core: consumes client bytes, produces the bytes the server should read.
struct Filter {
    authority: &'static str,
    state: State,
    /// The connection's HPACK decoder, which mirrors the client's encoder.
    decoder: Decoder<'static>,
    out: Vec<u8>,
    /// How much of `out` has already been returned.
    out_pos: usize,
}

impl Filter {
    fn new(authority: &'static str) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(MAX_DYNAMIC_TABLE_SIZE);
        Self {
            authority,
            state: State::Preface { matched: 0 },
            decoder,
            out: Vec::new(),
            out_pos: 0,
        }
    }

    fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    fn drain_into(&mut self, buf: &mut ReadBuf<'_>) {
        let pending = &self.out[self.out_pos..];
        let n = pending.len().min(buf.remaining());
        buf.put_slice(&pending[..n]);
        self.out_pos += n;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > RETAINED_OUTPUT_CAPACITY {
                self.out.shrink_to(READ_CHUNK);
            }
        }
    }

    fn verbatim_len(&self) -> Verbatim {
        match self.state {
            State::Passthrough => Verbatim::All,
            State::Forward { remaining } => Verbatim::Upto(remaining),
            _ => Verbatim::Upto(0),
        }
    }

    /// Records that `n` bytes, at most [`Filter::verbatim_len`], were passed on by the caller.
    fn skip_verbatim(&mut self, n: usize) {
        if let State::Forward { remaining } = &mut self.state {
            *remaining = remaining.saturating_sub(n);
            if *remaining == 0 {
                self.state = State::frame_header(None);
            }
        }
    }

    /// The client closed the connection: whatever is held back goes out as it came in.
    fn finish(&mut self) {
        match mem::replace(&mut self.state, State::Passthrough) {
            State::Preface { .. } | State::Forward { .. } | State::Passthrough => {}
            State::FrameHeader {
                bytes,
                filled,
                open,
            } => {
                if let Some(block) = open {
                    self.out.extend_from_slice(&block.raw);
                }
                self.out.extend_from_slice(&bytes[..filled]);
                if filled > 0 {
                    tracing::debug!(reason = %Bypass::Truncated, "authority filter stopped");
                }
            }
            State::Collect { block, .. } => {
                self.out.extend_from_slice(&block.raw);
                tracing::debug!(reason = %Bypass::Truncated, "authority filter stopped");
            }
        }
    }

    /// Consumes all of `input`, appending what the server should read to the output.
    fn push(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            let state = mem::replace(&mut self.state, State::Passthrough);
            self.state = match state {
                State::Passthrough => {
                    self.out.extend_from_slice(input);
                    return;
                }
                State::Preface { matched } => {
                    let expected = &PREFACE[matched..];
                    let n = expected.len().min(input.len());
                    if input[..n] != expected[..n] {
                        // The matched prefix is already out, so the rest follows unchanged.
                        bypass(Bypass::NotHttp2)
                    } else {
                        self.out.extend_from_slice(&input[..n]);
                        input = &input[n..];
                        if matched + n == PREFACE.len() {
                            State::frame_header(None)
                        } else {
                            State::Preface {
                                matched: matched + n,
                            }
                        }
                    }
                }
                State::FrameHeader {
                    mut bytes,
                    filled,
                    open,
                } => {
                    let n = (FRAME_HEADER_LEN - filled).min(input.len());
                    bytes[filled..filled + n].copy_from_slice(&input[..n]);
                    input = &input[n..];
                    if filled + n == FRAME_HEADER_LEN {
                        self.on_frame_header(bytes, open)
                    } else {
                        State::FrameHeader {
                            bytes,
                            filled: filled + n,
                            open,
                        }
                    }
                }
                State::Forward { remaining } => {
                    let n = remaining.min(input.len());
                    self.out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if remaining == n {
                        State::frame_header(None)
                    } else {
                        State::Forward {
                            remaining: remaining - n,
                        }
                    }
                }
                State::Collect {
                    mut block,
                    remaining,
                } => {
                    let n = remaining.min(input.len());
                    block.raw.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if remaining == n {
                        self.on_frame_complete(block)
                    } else {
                        State::Collect {
                            block,
                            remaining: remaining - n,
                        }
                    }
                }
            };
        }
    }

    /// Decides what to do with a frame from its header alone.
    fn on_frame_header(
        &mut self,
        bytes: [u8; FRAME_HEADER_LEN],
        open: Option<HeaderBlock>,
    ) -> State {
        let frame = FrameHeader::parse(&bytes);
        if let Some(mut block) = open {
            // RFC 9113 §6.10: nothing may interleave with a header block.
            if frame.kind != FRAME_CONTINUATION || frame.stream_id != block.stream_id {
                self.out.extend_from_slice(&block.raw);
                self.out.extend_from_slice(&bytes);
                return bypass(Bypass::MalformedFrame {
                    frame: frame_name(frame.kind),
                    stream_id: frame.stream_id,
                    problem: "interrupts an unfinished header block",
                });
            }
            if block.raw.len() + FRAME_HEADER_LEN + frame.len > MAX_HEADER_BLOCK {
                self.out.extend_from_slice(&block.raw);
                self.out.extend_from_slice(&bytes);
                return bypass(Bypass::BlockTooLarge {
                    stream_id: block.stream_id,
                });
            }
            block.frame_start = block.raw.len();
            block.frame = frame;
            block.raw.extend_from_slice(&bytes);
            return self.collect(block, frame.len);
        }
        match frame.kind {
            FRAME_HEADERS => {
                if frame.stream_id == 0 {
                    self.out.extend_from_slice(&bytes);
                    return bypass(Bypass::MalformedFrame {
                        frame: "HEADERS",
                        stream_id: 0,
                        problem: "stream 0",
                    });
                }
                if FRAME_HEADER_LEN + frame.len > MAX_HEADER_BLOCK {
                    self.out.extend_from_slice(&bytes);
                    return bypass(Bypass::BlockTooLarge {
                        stream_id: frame.stream_id,
                    });
                }
                let mut raw = Vec::with_capacity(FRAME_HEADER_LEN + frame.len);
                raw.extend_from_slice(&bytes);
                let block = HeaderBlock {
                    stream_id: frame.stream_id,
                    end_stream: frame.flags & FLAG_END_STREAM != 0,
                    priority: None,
                    raw,
                    fragment: Vec::new(),
                    frame,
                    frame_start: 0,
                };
                self.collect(block, frame.len)
            }
            // A CONTINUATION outside a block is a protocol error, and a client never sends
            // PUSH_PROMISE; both would carry HPACK data the server must judge unaltered.
            FRAME_CONTINUATION | FRAME_PUSH_PROMISE => {
                self.out.extend_from_slice(&bytes);
                bypass(Bypass::MalformedFrame {
                    frame: frame_name(frame.kind),
                    stream_id: frame.stream_id,
                    problem: "not allowed here from a client",
                })
            }
            _ => {
                self.out.extend_from_slice(&bytes);
                if frame.len == 0 {
                    State::frame_header(None)
                } else {
                    State::Forward {
                        remaining: frame.len,
                    }
                }
            }
        }
    }

    /// Starts reading a header-block frame's payload; an empty payload is complete at once.
    fn collect(&mut self, block: HeaderBlock, len: usize) -> State {
        if len == 0 {
            self.on_frame_complete(block)
        } else {
            State::Collect {
                block,
                remaining: len,
            }
        }
    }

    /// A HEADERS or CONTINUATION frame has been read whole.
    fn on_frame_complete(&mut self, mut block: HeaderBlock) -> State {
        let frame = block.frame;
        let payload_start = block.frame_start + FRAME_HEADER_LEN;
        let (start, end) = if frame.kind == FRAME_HEADERS {
            match headers_fragment(&block.raw[payload_start..], frame.flags) {
                Ok((priority, start, end)) => {
                    block.priority = priority;
                    (payload_start + start, payload_start + end)
                }
                Err(problem) => {
                    self.out.extend_from_slice(&block.raw);
                    return bypass(Bypass::MalformedFrame {
                        frame: "HEADERS",
                        stream_id: frame.stream_id,
                        problem,
                    });
                }
            }
        } else {
            (payload_start, block.raw.len())
        };
        let end_headers = frame.flags & FLAG_END_HEADERS != 0;
        if end_headers && block.frame_start == 0 {
            // The common case, a block in one HEADERS frame: decode it where it lies.
            return self.emit(&block, &block.raw[start..end]);
        }
        block.fragment.extend_from_slice(&block.raw[start..end]);
        if end_headers {
            let fragment = mem::take(&mut block.fragment);
            return self.emit(&block, &fragment);
        }
        State::frame_header(Some(block))
    }

    /// Re-encodes a complete header block and queues its frames.
    fn emit(&mut self, block: &HeaderBlock, fragment: &[u8]) -> State {
        let mut encoded = Vec::with_capacity(fragment.len() + 16);
        let decoded =
            decode_replacing_authority(&mut self.decoder, fragment, self.authority, &mut encoded);
        if let Err(source) = decoded {
            self.out.extend_from_slice(&block.raw);
            return bypass(Bypass::Hpack {
                stream_id: block.stream_id,
                source,
            });
        }
        write_header_block(
            &mut self.out,
            block.stream_id,
            block.end_stream,
            block.priority,
            &encoded,
        );
        State::frame_header(None)
    }
}

/// Stops filtering for the rest of the connection. Callers have already emitted every byte they
/// held back.
fn bypass(reason: Bypass) -> State {
    tracing::debug!(%reason, "authority filter stopped; passing the connection through");
    State::Passthrough
}

impl State {
    fn frame_header(open: Option<HeaderBlock>) -> Self {
        State::FrameHeader {
            bytes: [0; FRAME_HEADER_LEN],
            filled: 0,
            open,
        }
    }
}

fn frame_name(kind: u8) -> &'static str {
    match kind {
        0x0 => "DATA",
        FRAME_HEADERS => "HEADERS",
        0x2 => "PRIORITY",
        0x3 => "RST_STREAM",
        0x4 => "SETTINGS",
        FRAME_PUSH_PROMISE => "PUSH_PROMISE",
        0x6 => "PING",
        0x7 => "GOAWAY",
        0x8 => "WINDOW_UPDATE",
        FRAME_CONTINUATION => "CONTINUATION",
        _ => "unknown",
    }
}

/// Finds the header block fragment in a HEADERS payload (RFC 9113 §6.2): returns the priority
/// fields, if any, and the fragment's range, padding excluded.
fn headers_fragment(
    payload: &[u8],
    flags: u8,
) -> Result<(Option<[u8; PRIORITY_LEN]>, usize, usize), &'static str> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & FLAG_PADDED != 0 {
        let Some(&pad_len) = payload.first() else {
            return Err("PADDED without a pad length");
        };
        start = 1;
        end = end
            .checked_sub(usize::from(pad_len))
            .ok_or("padding longer than the payload")?;
    }
    let mut priority = None;
    if flags & FLAG_PRIORITY != 0 {
        let fields = payload
            .get(start..start + PRIORITY_LEN)
            .ok_or("PRIORITY fields truncated")?;
        let mut copy = [0; PRIORITY_LEN];
        copy.copy_from_slice(fields);
        priority = Some(copy);
        start += PRIORITY_LEN;
    }
    if start > end {
        return Err("padding longer than the payload");
    }
    Ok((priority, start, end))
}

/// Decodes one header block and appends its re-encoding to `encoded`, with every `:authority`
/// value replaced. On error `encoded` holds garbage and the decoder is out of step with the
/// client; the caller must stop filtering.
fn decode_replacing_authority(
    decoder: &mut Decoder<'static>,
    fragment: &[u8],
    authority: &str,
    encoded: &mut Vec<u8>,
) -> Result<(), loona_hpack::decoder::DecoderError> {
    decoder.decode_with_cb(fragment, |name, value| {
        let value: &[u8] = if &*name == b":authority" {
            authority.as_bytes()
        } else {
            &value
        };
        encode_field(encoded, &name, value);
    })
}

/// Writes an encoded header block as HEADERS followed by as many CONTINUATION frames as needed.
fn write_header_block(
    out: &mut Vec<u8>,
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    mut block: &[u8],
) {
    let mut flags = if end_stream { FLAG_END_STREAM } else { 0 };
    let first_room = match priority {
        Some(_) => {
            flags |= FLAG_PRIORITY;
            MAX_OUTPUT_FRAME_PAYLOAD - PRIORITY_LEN
        }
        None => MAX_OUTPUT_FRAME_PAYLOAD,
    };
    let take = block.len().min(first_room);
    let (first, rest) = block.split_at(take);
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    let prefix = priority.as_ref().map_or(&[][..], |p| &p[..]);
    write_frame_header(out, prefix.len() + first.len(), FRAME_HEADERS, flags, stream_id);
    out.extend_from_slice(prefix);
    out.extend_from_slice(first);
    block = rest;
    while !block.is_empty() {
        let take = block.len().min(MAX_OUTPUT_FRAME_PAYLOAD);
        let (chunk, rest) = block.split_at(take);
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        write_frame_header(out, chunk.len(), FRAME_CONTINUATION, flags, stream_id);
        out.extend_from_slice(chunk);
        block = rest;
    }
}

/// Callers keep `len` at or below [`MAX_OUTPUT_FRAME_PAYLOAD`], well inside the 24-bit field.
fn write_frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream_id: u32) {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
}

/// Encodes one field without touching the dynamic table (RFC 7541 §6.1, §6.2.2): a static-table
/// index when name and value are both there, otherwise a literal without indexing, with the
/// name indexed when the static table has it.
fn encode_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    let mut name_index = None;
    for (i, &(static_name, static_value)) in STATIC_TABLE.iter().enumerate() {
        if static_name.as_bytes() == name {
            let index = i + 1;
            if static_value.as_bytes() == value {
                encode_integer(out, index, 7, 0x80);
                return;
            }
            name_index.get_or_insert(index);
        }
    }
    match name_index {
        Some(index) => encode_integer(out, index, 4, 0x00),
        None => {
            out.push(0x00);
            encode_string(out, name);
        }
    }
    encode_string(out, value);
}

/// A string literal without Huffman coding (RFC 7541 §5.2).
fn encode_string(out: &mut Vec<u8>, bytes: &[u8]) {
    encode_integer(out, bytes.len(), 7, 0x00);
    out.extend_from_slice(bytes);
}

/// An integer with an N-bit prefix (RFC 7541 §5.1); `pattern` holds the bits above the prefix.
fn encode_integer(out: &mut Vec<u8>, value: usize, prefix_bits: u32, pattern: u8) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        // `value` is below `max_prefix`, at most 127, so it fits the prefix.
        out.push(pattern | value as u8);
        return;
    }
    out.push(pattern | max_prefix as u8);
    let mut rest = value - max_prefix;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// The HPACK static table (RFC 7541 Appendix A); entry `i` has index `i + 1`.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];
