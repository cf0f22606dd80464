//! The gRPC codec of the ADS service: requests are decoded with prost; responses are
//! already encoded ([`EncodedResponse`]) and are only copied into the frame.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::snapshot::EncodedResponse;

/// Initial decode buffer: xDS requests are small; the buffer grows when one is not.
const DECODE_BUFFER: usize = 1024;
/// Initial encode buffer. Each stream keeps its buffer for its lifetime, so this is
/// paid per stream; a larger response grows it once.
const ENCODE_BUFFER: usize = 1024;
/// tonic's default yield threshold.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Codec decoding `Req` and writing pre-encoded responses.
#[derive(Debug)]
pub(crate) struct AdsCodec<Req>(PhantomData<fn() -> Req>);

impl<Req> Default for AdsCodec<Req> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<Req: prost::Message + Default + Send + 'static> Codec for AdsCodec<Req> {
    type Encode = EncodedResponse;
    type Decode = Req;
    type Encoder = ResponseEncoder;
    type Decoder = RequestDecoder<Req>;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(PhantomData)
    }
}

/// Copies a pre-encoded response into the outgoing frame.
#[derive(Debug)]
pub(crate) struct ResponseEncoder;

impl Encoder for ResponseEncoder {
    type Item = EncodedResponse;
    type Error = Status;

    fn encode(&mut self, item: EncodedResponse, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.write_to(dst);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD)
    }
}

/// Decodes one request message.
#[derive(Debug)]
pub(crate) struct RequestDecoder<Req>(PhantomData<fn() -> Req>);

impl<Req: prost::Message + Default> Decoder for RequestDecoder<Req> {
    type Item = Req;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Req>, Status> {
        Req::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("undecodable xDS request: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(DECODE_BUFFER, YIELD_THRESHOLD)
    }
}
