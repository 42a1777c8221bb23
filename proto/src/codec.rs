//! The prost codec with buffers sized for callbridge's messages.
//!
//! tonic gives every RPC an 8 KiB encode buffer and an 8 KiB decode buffer. A relay keeps
//! one attach stream per live call (control one per call it serves), and their messages
//! are events, acks and commands, most under 256 bytes (an ack is a few), so at a
//! thousand calls the default buffers were most of the production path's extra memory per
//! call (docs/performance.md). Buffers grow when a message is larger; events come a few a
//! second at most, so the odd reallocation costs nothing the audio path would notice.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial encode and decode buffer per RPC (bytes).
pub const BUFFER_BYTES: usize = 256;
/// Bytes a streaming encoder batches before it yields (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`BUFFER_BYTES`] buffers; the generated clients and servers use it.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
