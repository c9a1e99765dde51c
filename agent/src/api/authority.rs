//! Rewrites the HTTP/2 `:authority` of Workload API requests before the gRPC server sees them.
//!
//! The Workload API is served over a Unix socket, where the authority means nothing, and clients
//! disagree on what to send: Rust and Go clients send `localhost`, gRPC core since 1.57 (Python,
//! Ruby, C++) sends the socket path percent-encoded (`%2Ftmp%2Fagent.sock`), and grpc-java's
//! Netty transport sends the raw path (`/tmp/agent.sock`). The `h2` crate validates `:authority`
//! as a URI authority, rejects all of these, and resets the stream with
//! `RST_STREAM(PROTOCOL_ERROR)` before tonic ever sees the request. No `h2` or hyper
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
use std::mem::{self, MaybeUninit};
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

/// Once drained, an output buffer larger than this is freed: most connections of the Workload
/// API are streams that stay idle for the life of an SVID, and thousands of them each keeping
/// a read's worth of buffer would cost more than allocating one again per request.
const RETAINED_OUTPUT_CAPACITY: usize = 1024;

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
            .field(
                "filtering",
                &!matches!(self.filter.state, State::Passthrough),
            )
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
                Verbatim::All => {
                    return Pin::new(&mut this.inner).poll_read(cx, buf);
                }
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
            // On the stack: the filter copies what it keeps, and a buffer kept per connection
            // would cost every idle client (a stream watching its SVIDs) 16 KiB.
            let mut storage = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut chunk = ReadBuf::uninit(&mut storage);
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
        let stream_id = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
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
    Collect {
        block: HeaderBlock,
        remaining: usize,
    },
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
                self.out = Vec::new();
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
    write_frame_header(
        out,
        prefix.len() + first.len(),
        FRAME_HEADERS,
        flags,
        stream_id,
    );
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

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    reason = "a test that meets an unexpected error should stop right there"
)]
mod tests {
    use super::*;

    use std::time::Duration;

    use loona_hpack::Encoder;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    /// What gRPC core (Python, C++, Ruby) sends for `unix:/tmp/agent.sock`.
    const ENCODED_PATH: &str = "%2Ftmp%2Fagent.sock";

    /// The client side of a connection that hands out its bytes `chunk` at a time, and is "not
    /// ready" before each chunk, as a socket under load would be.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
        ready: bool,
    }

    impl Trickle {
        fn new(data: &[u8], chunk: usize) -> Self {
            Self {
                data: data.to_vec(),
                pos: 0,
                chunk,
                ready: false,
            }
        }
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if !this.ready {
                this.ready = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            this.ready = false;
            let n = this
                .chunk
                .min(this.data.len() - this.pos)
                .min(buf.remaining());
            buf.put_slice(&this.data[this.pos..this.pos + n]);
            this.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Reads `input` through the filter, `chunk` bytes at a time on both sides.
    async fn filter_all(input: &[u8], chunk: usize) -> Vec<u8> {
        let mut filtered = NormalizeAuthority::new(Trickle::new(input, chunk), "localhost");
        let mut output = Vec::new();
        let mut buf = vec![0; chunk];
        loop {
            let n = filtered.read(&mut buf).await.unwrap();
            if n == 0 {
                return output;
            }
            output.extend_from_slice(&buf[..n]);
        }
    }

    /// `assert_eq!` for byte strings too long to print.
    fn assert_same(actual: &[u8], expected: &[u8], context: &str) {
        if actual != expected {
            let at = actual
                .iter()
                .zip(expected)
                .position(|(a, e)| a != e)
                .unwrap_or(actual.len().min(expected.len()));
            panic!(
                "{context}: {} bytes, expected {}; first difference at {at}",
                actual.len(),
                expected.len()
            );
        }
    }

    /// Read sizes every test runs with: byte by byte, odd-sized, everything at once.
    fn chunkings(input: &[u8]) -> [usize; 3] {
        [1, 7, input.len().max(1)]
    }

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame_header(&mut out, payload.len(), kind, flags, stream_id);
        out.extend_from_slice(payload);
        out
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Frame {
        kind: u8,
        flags: u8,
        stream_id: u32,
        payload: Vec<u8>,
    }

    fn parse_frames(mut bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let head: [u8; FRAME_HEADER_LEN] = bytes[..FRAME_HEADER_LEN].try_into().unwrap();
            let header = FrameHeader::parse(&head);
            let end = FRAME_HEADER_LEN + header.len;
            frames.push(Frame {
                kind: header.kind,
                flags: header.flags,
                stream_id: header.stream_id,
                payload: bytes[FRAME_HEADER_LEN..end].to_vec(),
            });
            bytes = &bytes[end..];
        }
        frames
    }

    fn owned(headers: &[(&str, &str)]) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn decode(decoder: &mut Decoder<'static>, block: &[u8]) -> Vec<(String, String)> {
        decoder
            .decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    fn encode(encoder: &mut Encoder<'static>, headers: &[(&str, &str)]) -> Vec<u8> {
        encoder.encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    fn grpc_request(authority: &str) -> Vec<(&str, &str)> {
        vec![
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("workload.spiffe.io", "true"),
        ]
    }

    fn with_localhost(headers: &[(&str, &str)]) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|&(n, v)| {
                let v = if n == ":authority" { "localhost" } else { v };
                (n.to_string(), v.to_string())
            })
            .collect()
    }

    /// A header block as the server sees it: frames joined, padding and priority dropped.
    #[derive(Debug)]
    struct Block {
        stream_id: u32,
        end_stream: bool,
        priority: Option<Vec<u8>>,
        fragment: Vec<u8>,
    }

    /// Collects the header blocks in `frames`, checking the framing the server will enforce.
    fn header_blocks(frames: &[Frame]) -> Vec<Block> {
        let mut blocks: Vec<Block> = Vec::new();
        let mut open = false;
        for frame in frames {
            assert!(frame.payload.len() <= MAX_OUTPUT_FRAME_PAYLOAD);
            match frame.kind {
                FRAME_HEADERS => {
                    assert!(!open, "HEADERS inside a header block");
                    let (priority, start, end) =
                        headers_fragment(&frame.payload, frame.flags).unwrap();
                    blocks.push(Block {
                        stream_id: frame.stream_id,
                        end_stream: frame.flags & FLAG_END_STREAM != 0,
                        priority: priority.map(|p| p.to_vec()),
                        fragment: frame.payload[start..end].to_vec(),
                    });
                    open = frame.flags & FLAG_END_HEADERS == 0;
                }
                FRAME_CONTINUATION => {
                    assert!(open, "CONTINUATION outside a header block");
                    let block = blocks.last_mut().unwrap();
                    assert_eq!(block.stream_id, frame.stream_id);
                    block.fragment.extend_from_slice(&frame.payload);
                    open = frame.flags & FLAG_END_HEADERS == 0;
                }
                _ => assert!(!open, "frame inside a header block"),
            }
        }
        assert!(!open, "unfinished header block");
        blocks
    }

    /// Output frames other than header blocks, which must come through byte for byte.
    fn other_frames(frames: &[Frame]) -> Vec<Frame> {
        frames
            .iter()
            .filter(|f| f.kind != FRAME_HEADERS && f.kind != FRAME_CONTINUATION)
            .cloned()
            .collect()
    }

    fn split_output(output: &[u8]) -> Vec<Frame> {
        assert_eq!(&output[..PREFACE.len()], PREFACE);
        parse_frames(&output[PREFACE.len()..])
    }

    #[tokio::test]
    async fn rewrites_authority_whatever_the_read_sizes() {
        let request = grpc_request(ENCODED_PATH);
        let block = encode(&mut Encoder::new(), &request);
        let settings = frame(0x4, 0, 0, &[0x00, 0x02, 0, 0, 0, 0]);
        let headers = frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block);
        let data_payload: Vec<u8> = (0..=255).cycle().take(3000).collect();
        let data = frame(0x0, FLAG_END_STREAM, 1, &data_payload);
        let window_update = frame(0x8, 0, 0, &[0, 0, 0x10, 0]);
        let input = [&PREFACE[..], &settings, &headers, &data, &window_update].concat();

        for chunk in chunkings(&input) {
            let frames = split_output(&filter_all(&input, chunk).await);
            assert_eq!(
                other_frames(&frames),
                other_frames(&parse_frames(&input[PREFACE.len()..])),
                "chunk {chunk}"
            );
            assert_eq!(frames.len(), 4, "chunk {chunk}");
            assert_eq!(frames[1].kind, FRAME_HEADERS);
            assert_eq!(frames[1].flags, FLAG_END_HEADERS);
            assert_eq!(frames[1].stream_id, 1);
            let blocks = header_blocks(&frames);
            assert_eq!(
                decode(&mut Decoder::new(), &blocks[0].fragment),
                with_localhost(&request),
                "chunk {chunk}"
            );
        }
    }

    #[tokio::test]
    async fn leaves_requests_without_authority_alone() {
        let request = [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            ("host", "example"),
        ];
        let block = encode(&mut Encoder::new(), &request);
        let input = [
            &PREFACE[..],
            &frame(FRAME_HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, 1, &block),
        ]
        .concat();
        let frames = split_output(&filter_all(&input, 7).await);
        let blocks = header_blocks(&frames);
        assert_eq!(blocks.len(), 1);
        assert!(blocks[0].end_stream);
        assert_eq!(
            decode(&mut Decoder::new(), &blocks[0].fragment),
            owned(&request)
        );
    }

    #[tokio::test]
    async fn joins_continuation_frames_and_splits_large_blocks() {
        let big = "a".repeat(40_000);
        let mut request = grpc_request(ENCODED_PATH);
        request.push(("x-big", &big));
        let block = encode(&mut Encoder::new(), &request);
        // The client's own split, at arbitrary points.
        let (a, rest) = block.split_at(10);
        let (b, c) = rest.split_at(20_000);
        let input = [
            &PREFACE[..],
            &frame(FRAME_HEADERS, FLAG_END_STREAM, 3, a),
            &frame(FRAME_CONTINUATION, 0, 3, b),
            &frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 3, c),
            &frame(0x6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]),
        ]
        .concat();

        for chunk in [7, input.len()] {
            let frames = split_output(&filter_all(&input, chunk).await);
            let kinds: Vec<(u8, u8)> = frames.iter().map(|f| (f.kind, f.flags)).collect();
            assert_eq!(
                kinds,
                [
                    (FRAME_HEADERS, FLAG_END_STREAM),
                    (FRAME_CONTINUATION, 0),
                    (FRAME_CONTINUATION, FLAG_END_HEADERS),
                    (0x6, 0),
                ],
                "chunk {chunk}"
            );
            assert_eq!(frames[0].payload.len(), MAX_OUTPUT_FRAME_PAYLOAD);
            let blocks = header_blocks(&frames);
            assert_eq!(blocks.len(), 1);
            assert_eq!(blocks[0].stream_id, 3);
            assert_eq!(
                decode(&mut Decoder::new(), &blocks[0].fragment),
                with_localhost(&request)
            );
            assert_eq!(frames[3].payload, [1, 2, 3, 4, 5, 6, 7, 8]);
        }
    }

    #[tokio::test]
    async fn strips_padding_and_keeps_priority() {
        let request = grpc_request(ENCODED_PATH);
        let block = encode(&mut Encoder::new(), &request);
        let priority = [0x80, 0, 0, 3, 15];
        let mut payload = vec![10];
        payload.extend_from_slice(&priority);
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&[0; 10]);
        let padded = FLAG_PADDED | FLAG_PRIORITY | FLAG_END_HEADERS | FLAG_END_STREAM;
        // The same request again, padded only, split over a CONTINUATION.
        let second = encode(&mut Encoder::new(), &request);
        let mut first_part = vec![3];
        first_part.extend_from_slice(&second[..5]);
        first_part.extend_from_slice(&[0; 3]);
        let input = [
            &PREFACE[..],
            &frame(FRAME_HEADERS, padded, 5, &payload),
            &frame(FRAME_HEADERS, FLAG_PADDED, 7, &first_part),
            &frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 7, &second[5..]),
        ]
        .concat();

        for chunk in chunkings(&input) {
            let frames = split_output(&filter_all(&input, chunk).await);
            assert_eq!(frames.len(), 2, "chunk {chunk}");
            assert_eq!(
                frames[0].flags,
                FLAG_PRIORITY | FLAG_END_HEADERS | FLAG_END_STREAM
            );
            assert_eq!(frames[1].flags, FLAG_END_HEADERS);
            let blocks = header_blocks(&frames);
            assert_eq!(blocks[0].priority.as_deref(), Some(&priority[..]));
            assert_eq!(blocks[1].priority, None);
            // One decoder for the connection, as the server has.
            let mut decoder = Decoder::new();
            for block in &blocks {
                assert_eq!(
                    decode(&mut decoder, &block.fragment),
                    with_localhost(&request)
                );
            }
        }
    }

    #[tokio::test]
    async fn follows_the_client_dynamic_table_across_streams() {
        let mut encoder = Encoder::new();
        let first = grpc_request(ENCODED_PATH);
        let mut second = grpc_request(ENCODED_PATH);
        second[2] = (":path", "/SpiffeWorkloadAPI/FetchJWTSVID");
        let first_block = encode(&mut encoder, &first);
        let second_block = encode(&mut encoder, &second);
        // The client refers to the authority it inserted while sending the first request.
        let mut client_view = Decoder::new();
        client_view.decode(&first_block).unwrap();
        assert!(
            Decoder::new().decode(&second_block).is_err(),
            "the second request must depend on the first one's dynamic-table entries"
        );
        let input = [
            &PREFACE[..],
            &frame(
                FRAME_HEADERS,
                FLAG_END_HEADERS | FLAG_END_STREAM,
                1,
                &first_block,
            ),
            &frame(
                FRAME_HEADERS,
                FLAG_END_HEADERS | FLAG_END_STREAM,
                3,
                &second_block,
            ),
        ]
        .concat();

        for chunk in chunkings(&input) {
            let blocks = header_blocks(&split_output(&filter_all(&input, chunk).await));
            assert_eq!(blocks.len(), 2);
            assert_eq!((blocks[0].stream_id, blocks[1].stream_id), (1, 3));
            // A fresh decoder per block: the output never relies on the server's dynamic table.
            assert_eq!(
                decode(&mut Decoder::new(), &blocks[0].fragment),
                with_localhost(&first)
            );
            assert_eq!(
                decode(&mut Decoder::new(), &blocks[1].fragment),
                with_localhost(&second)
            );
            // Nor does it fill it: after both blocks, the first dynamic index is still unused.
            let mut server = Decoder::new();
            for block in &blocks {
                server.decode(&block.fragment).unwrap();
            }
            assert_eq!(
                server.decode(&[0x80 | 62]),
                Err(loona_hpack::decoder::DecoderError::HeaderIndexOutOfBounds)
            );
        }
    }

    /// RFC 7541 Appendix C.4: three requests with Huffman-coded strings, the later ones
    /// referring to dynamic-table entries the earlier ones added.
    #[tokio::test]
    async fn decodes_the_rfc7541_huffman_examples() {
        let requests: [&[u8]; 3] = [
            &[
                0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
                0x90, 0xf4, 0xff,
            ],
            &[
                0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf,
            ],
            &[
                0x82, 0x87, 0x85, 0xbf, 0x40, 0x88, 0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xa9, 0x7d, 0x7f,
                0x89, 0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xb8, 0xe8, 0xb4, 0xbf,
            ],
        ];
        let expected = [
            owned(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "localhost"),
            ]),
            owned(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "localhost"),
                ("cache-control", "no-cache"),
            ]),
            owned(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "localhost"),
                ("custom-key", "custom-value"),
            ]),
        ];
        let mut input = PREFACE.to_vec();
        for (i, block) in requests.iter().enumerate() {
            let stream_id = 2 * u32::try_from(i).unwrap() + 1;
            input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, stream_id, block));
        }
        for chunk in chunkings(&input) {
            let blocks = header_blocks(&split_output(&filter_all(&input, chunk).await));
            let decoded: Vec<_> = blocks
                .iter()
                .map(|b| decode(&mut Decoder::new(), &b.fragment))
                .collect();
            assert_eq!(decoded, expected, "chunk {chunk}");
        }
    }

    #[tokio::test]
    async fn passes_non_http2_input_through() {
        let inputs: [&[u8]; 5] = [
            b"GET / HTTP/1.1\r\nHost: %2Ftmp%2Fagent.sock\r\n\r\n",
            b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\nmore bytes",
            b"PRI * HT",
            b"",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ];
        for input in inputs {
            for chunk in chunkings(input) {
                assert_same(
                    &filter_all(input, chunk).await,
                    input,
                    &format!("chunk {chunk}"),
                );
            }
        }
    }

    #[tokio::test]
    async fn stops_filtering_at_malformed_frames() {
        let block = encode(&mut Encoder::new(), &grpc_request(ENCODED_PATH));
        let valid = frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block);
        let bad_hpack = frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &[0xff, 0xff, 0x7f]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "frame inside a header block",
                [
                    frame(FRAME_HEADERS, 0, 1, &block[..4]),
                    frame(0x0, 0, 1, b"data"),
                    valid.clone(),
                ]
                .concat(),
            ),
            (
                "CONTINUATION of another stream",
                [
                    frame(FRAME_HEADERS, 0, 1, &block[..4]),
                    frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 3, &block[4..]),
                ]
                .concat(),
            ),
            (
                "CONTINUATION without HEADERS",
                [
                    frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 1, &block),
                    valid.clone(),
                ]
                .concat(),
            ),
            (
                "HEADERS on stream 0",
                [
                    frame(FRAME_HEADERS, FLAG_END_HEADERS, 0, &block),
                    valid.clone(),
                ]
                .concat(),
            ),
            (
                "padding longer than the payload",
                [
                    frame(
                        FRAME_HEADERS,
                        FLAG_END_HEADERS | FLAG_PADDED,
                        1,
                        &[200, 0x82],
                    ),
                    valid.clone(),
                ]
                .concat(),
            ),
            (
                "PRIORITY fields cut short",
                [frame(
                    FRAME_HEADERS,
                    FLAG_END_HEADERS | FLAG_PRIORITY,
                    1,
                    &[0, 0],
                )]
                .concat(),
            ),
            ("invalid HPACK", [bad_hpack.clone(), valid.clone()].concat()),
            (
                "dynamic table size update past the limit",
                [
                    frame(
                        FRAME_HEADERS,
                        FLAG_END_HEADERS,
                        1,
                        &[0x3f, 0xe2, 0xff, 0x03, 0x82],
                    ),
                    valid.clone(),
                ]
                .concat(),
            ),
            (
                "PUSH_PROMISE from a client",
                [
                    frame(FRAME_PUSH_PROMISE, FLAG_END_HEADERS, 1, &[0, 0, 0, 2]),
                    valid.clone(),
                ]
                .concat(),
            ),
            (
                "truncated header block",
                frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block)[..12].to_vec(),
            ),
            (
                "truncated frame header",
                frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block)[..5].to_vec(),
            ),
            (
                "unfinished header block",
                frame(FRAME_HEADERS, FLAG_END_STREAM, 1, &block),
            ),
        ];
        for (name, frames) in cases {
            let input = [&PREFACE[..], &frames].concat();
            for chunk in chunkings(&input) {
                assert_same(
                    &filter_all(&input, chunk).await,
                    &input,
                    &format!("{name}, chunk {chunk}"),
                );
            }
        }

        // Requests before the malformed frame are rewritten; nothing after it is.
        let rewritten = filter_all(&[&PREFACE[..], &valid].concat(), 7).await;
        let tail = [bad_hpack, valid.clone()].concat();
        let input = [&PREFACE[..], &valid, &tail].concat();
        assert_same(
            &filter_all(&input, 7).await,
            &[rewritten.as_slice(), &tail].concat(),
            "rewritten, then malformed",
        );
    }

    #[tokio::test]
    async fn passes_oversized_header_blocks_through() {
        let block = encode(&mut Encoder::new(), &grpc_request(ENCODED_PATH));
        // One frame that is larger than the limit on its own, and a block that grows past it.
        let huge = vec![0x82; MAX_HEADER_BLOCK];
        let one_frame = [
            &PREFACE[..],
            &frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &huge),
        ]
        .concat();
        let mut many_frames = [&PREFACE[..], &frame(FRAME_HEADERS, 0, 1, &block)].concat();
        for _ in 0..=(MAX_HEADER_BLOCK / 16_000) {
            many_frames.extend(frame(FRAME_CONTINUATION, 0, 1, &[0x82; 16_000]));
        }
        many_frames.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 1, &[0x82]));
        for input in [one_frame, many_frames] {
            for chunk in [1000, input.len()] {
                assert_same(&filter_all(&input, chunk).await, &input, "oversized");
            }
        }
    }

    /// A small deterministic generator, so that failures reproduce.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
        }
    }

    /// Random frame sequences, some valid and most not, never panic or hang the filter, and the
    /// output never depends on how the input was cut into reads.
    #[tokio::test]
    async fn arbitrary_input_is_handled_the_same_however_it_is_read() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let valid = encode(&mut Encoder::new(), &grpc_request(ENCODED_PATH));
        for _ in 0..300 {
            let mut input = PREFACE.to_vec();
            for _ in 0..rng.below(6) {
                let kind = [FRAME_HEADERS, FRAME_CONTINUATION, 0x0, 0x4, 0x8, 0xfe][rng.below(6)];
                let flags = u8::try_from(rng.below(256)).unwrap();
                let stream_id = u32::try_from(rng.below(4)).unwrap();
                let payload: Vec<u8> = match rng.below(3) {
                    0 => valid.clone(),
                    1 => valid[..rng.below(valid.len())].to_vec(),
                    _ => (0..rng.below(64))
                        .map(|_| u8::try_from(rng.below(256)).unwrap())
                        .collect(),
                };
                input.extend(frame(kind, flags, stream_id, &payload));
            }
            if rng.below(4) == 0 {
                input.truncate(rng.below(input.len() + 1));
            }
            let whole = filter_all(&input, input.len().max(1)).await;
            assert_same(&filter_all(&input, 1).await, &whole, "chunk 1");
            assert_same(&filter_all(&input, 7).await, &whole, "chunk 7");
        }
    }

    #[test]
    fn static_table_matches_rfc7541() {
        let mut decoder = Decoder::new();
        for (i, (name, value)) in STATIC_TABLE.iter().enumerate() {
            let index = u8::try_from(i + 1).unwrap();
            assert_eq!(
                decode(&mut decoder, &[0x80 | index]),
                owned(&[(name, value)])
            );
        }
    }

    #[test]
    fn integers_encode_as_in_rfc7541_appendix_c1() {
        let mut out = Vec::new();
        encode_integer(&mut out, 10, 5, 0);
        assert_eq!(out, [0x0a]);
        out.clear();
        encode_integer(&mut out, 1337, 5, 0);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        out.clear();
        encode_integer(&mut out, 42, 8, 0);
        assert_eq!(out, [0x2a]);
        out.clear();
        encode_integer(&mut out, 15, 4, 0xf0);
        assert_eq!(out, [0xff, 0x00]);
    }

    #[test]
    fn wrapper_fits_a_tonic_incoming_stream() {
        fn assert_io<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static>() {}
        assert_io::<NormalizeAuthority<UnixStream>>();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let wrapped = NormalizeAuthority::new(a, "localhost");
        assert!(wrapped.get_ref().peer_addr().is_ok());
        assert!(format!("{wrapped:?}").contains("filtering: true"));
    }

    /// What the raw client got back for its request on stream 1.
    #[derive(Debug, PartialEq, Eq)]
    enum Reply {
        Headers { status: String },
        Reset { code: u32 },
        GoAway { code: u32 },
        Closed,
    }

    const PROTOCOL_ERROR: u32 = 0x1;

    /// An `h2` server that answers every request with 200 and reports the last authority seen.
    async fn serve<T: AsyncRead + AsyncWrite + Unpin>(io: T) -> Option<String> {
        let mut connection = h2::server::handshake(io).await.ok()?;
        let mut seen = None;
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            seen = request.uri().authority().map(ToString::to_string);
            let response = http::Response::builder().status(200).body(()).unwrap();
            respond.send_response(response, true).unwrap();
        }
        seen
    }

    async fn read_frame(io: &mut UnixStream) -> Option<Frame> {
        let mut head = [0; FRAME_HEADER_LEN];
        io.read_exact(&mut head).await.ok()?;
        let header = FrameHeader::parse(&head);
        let mut payload = vec![0; header.len];
        io.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: header.kind,
            flags: header.flags,
            stream_id: header.stream_id,
            payload,
        })
    }

    /// A gRPC client as far as framing goes, sending `authority` the way gRPC core does.
    async fn raw_client(mut io: UnixStream, authority: &str) -> Reply {
        io.write_all(PREFACE).await.unwrap();
        io.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
        loop {
            let Some(frame_in) = read_frame(&mut io).await else {
                return Reply::Closed;
            };
            if frame_in.kind == 0x4 && frame_in.flags & 0x1 == 0 {
                io.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap();
                break;
            }
        }
        let block = encode(&mut Encoder::new(), &grpc_request(authority));
        let flags = FLAG_END_HEADERS | FLAG_END_STREAM;
        io.write_all(&frame(FRAME_HEADERS, flags, 1, &block))
            .await
            .unwrap();
        let mut decoder = Decoder::new();
        loop {
            let Some(reply) = read_frame(&mut io).await else {
                return Reply::Closed;
            };
            match reply.kind {
                FRAME_HEADERS if reply.stream_id == 1 => {
                    assert_ne!(reply.flags & FLAG_END_HEADERS, 0);
                    let (_, start, end) = headers_fragment(&reply.payload, reply.flags).unwrap();
                    let headers = decode(&mut decoder, &reply.payload[start..end]);
                    let status = headers
                        .into_iter()
                        .find(|(name, _)| name == ":status")
                        .map(|(_, value)| value)
                        .unwrap_or_default();
                    return Reply::Headers { status };
                }
                0x3 if reply.stream_id == 1 => {
                    let code = u32::from_be_bytes(reply.payload[..4].try_into().unwrap());
                    return Reply::Reset { code };
                }
                0x7 => {
                    let code = u32::from_be_bytes(reply.payload[4..8].try_into().unwrap());
                    return Reply::GoAway { code };
                }
                _ => {}
            }
        }
    }

    /// One request over a real Unix socket pair; returns the client's reply and the authority
    /// the server saw.
    async fn exchange(authority: &str, filtered: bool) -> (Reply, Option<String>) {
        let (client, server) = UnixStream::pair().unwrap();
        let server = tokio::spawn(async move {
            if filtered {
                serve(NormalizeAuthority::new(server, "localhost")).await
            } else {
                serve(server).await
            }
        });
        let limit = Duration::from_secs(10);
        let reply = tokio::time::timeout(limit, raw_client(client, authority))
            .await
            .unwrap();
        let seen = tokio::time::timeout(limit, server).await.unwrap().unwrap();
        (reply, seen)
    }

    /// Forms the socket path takes in clients' `:authority`.
    const SOCKET_AUTHORITIES: [&str; 4] = [
        ENCODED_PATH,
        "/tmp/agent.sock",
        "unix:/tmp/agent.sock",
        "unix:%2Ftmp%2Fagent.sock",
    ];

    #[tokio::test]
    async fn h2_resets_socket_path_authorities_without_the_filter() {
        let ok = Reply::Headers {
            status: "200".into(),
        };
        assert_eq!(
            exchange("localhost", false).await,
            (ok, Some("localhost".into())),
            "the raw client itself must work"
        );
        // Every form a client may derive from the socket path is refused by h2 itself; these
        // are the requests the filter exists for.
        for authority in SOCKET_AUTHORITIES {
            assert_eq!(
                exchange(authority, false).await,
                (
                    Reply::Reset {
                        code: PROTOCOL_ERROR
                    },
                    None
                ),
                "{authority:?}"
            );
        }
    }

    #[tokio::test]
    async fn h2_accepts_socket_path_authorities_through_the_filter() {
        for authority in ["localhost", ENCODED_PATH]
            .into_iter()
            .chain(SOCKET_AUTHORITIES)
        {
            let (reply, seen) = exchange(authority, true).await;
            assert_eq!(
                reply,
                Reply::Headers {
                    status: "200".into()
                },
                "{authority:?}"
            );
            assert_eq!(seen.as_deref(), Some("localhost"), "{authority:?}");
        }
    }
}
