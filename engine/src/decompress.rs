//! Reading layer blobs whatever their compression: gzip (every member, as `gzip -d` does),
//! zstd (every frame; skippable frames skipped) or a plain tar. What `inspect` and `verify`
//! read layers with, so they see the same bytes a build unpacks.

use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

/// A zstd stream of one or more frames (skippable frames are skipped).
struct ZstdFrames<R: BufRead> {
    source: R,
    decoder: ruzstd::decoding::FrameDecoder,
    active: bool,
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        if buffer.is_empty() {
            return Ok(0);
        }
        loop {
            if self.active {
                while self.decoder.can_collect() < buffer.len() && !self.decoder.is_finished() {
                    let wanted = buffer.len() - self.decoder.can_collect();
                    self.decoder
                        .decode_blocks(
                            &mut self.source,
                            ruzstd::decoding::BlockDecodingStrategy::UptoBytes(wanted),
                        )
                        .map_err(io::Error::other)?;
                }
                let read = self.decoder.read(buffer)?;
                if read > 0 {
                    return Ok(read);
                }
                if self.decoder.is_finished() && self.decoder.can_collect() == 0 {
                    self.active = false;
                } else {
                    continue;
                }
            }
            if self.source.fill_buf()?.is_empty() {
                return Ok(0);
            }
            match self.decoder.reset(&mut self.source) {
                Ok(()) => self.active = true,
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped = io::copy(
                        &mut (&mut self.source).take(u64::from(length)),
                        &mut io::sink(),
                    )?;
                    if skipped != u64::from(length) {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "truncated skippable zstd frame",
                        ));
                    }
                }
                Err(error) => return Err(io::Error::other(error)),
            }
        }
    }
}

/// The uncompressed bytes of a layer blob; the compression is picked from its first bytes.
pub fn decompressed<'a>(blob: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut reader = BufReader::with_capacity(256 * 1024, blob);
    let mut head = Vec::with_capacity(4);
    // `fill_buf` may return fewer than 4 bytes from a pipe; peek without consuming by reading
    // into `head` and chaining it back in front.
    while head.len() < 4 {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            break;
        }
        let take = available.len().min(4 - head.len());
        head.extend_from_slice(&available[..take]);
        reader.consume(take);
    }
    let stream = BufReader::new(io::Cursor::new(head.clone()).chain(reader));
    Ok(match head.as_slice() {
        [0x1f, 0x8b, ..] => Box::new(flate2::bufread::MultiGzDecoder::new(stream)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(ZstdFrames {
            source: stream,
            decoder: ruzstd::decoding::FrameDecoder::new(),
            active: false,
        }),
        _ => Box::new(stream),
    })
}

/// The xz stream magic.
const XZ_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0];

/// An archive an `add` extracts, in any compression Docker extracts: bzip2 and xz are decoded
/// here (every stream), anything else passes through unchanged for [`decompressed`] (gzip,
/// zstd, plain tar), so an archive goes through the same reader a layer does.
pub fn archive<'a>(source: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut reader = BufReader::with_capacity(256 * 1024, source);
    let head = reader.fill_buf()?;
    if head.starts_with(b"BZh") {
        return Ok(Box::new(bzip2::bufread::MultiBzDecoder::new(reader)));
    }
    if head.starts_with(&XZ_MAGIC) {
        return Ok(Box::new(lzma_rust2::XzReader::new(reader, true)));
    }
    Ok(Box::new(reader))
}

/// The uncompressed size of the layer blob in `path`.
pub fn uncompressed_size(path: &Path) -> io::Result<u64> {
    let file = std::fs::File::open(path)?;
    io::copy(&mut decompressed(file)?, &mut io::sink())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn read_all(blob: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        decompressed(blob).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn bzip2_and_xz_archives_are_decoded_and_others_pass_through() {
        let mut bzip2 = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        bzip2.write_all(b"bzip2 body").unwrap();
        let mut xz =
            lzma_rust2::XzWriter::new(Vec::new(), lzma_rust2::XzOptions::default()).unwrap();
        xz.write_all(b"xz body").unwrap();
        let read = |blob: Vec<u8>| {
            let mut out = Vec::new();
            archive(&blob[..]).unwrap().read_to_end(&mut out).unwrap();
            out
        };
        assert_eq!(read(bzip2.finish().unwrap()), b"bzip2 body");
        assert_eq!(read(xz.finish().unwrap()), b"xz body");
        assert_eq!(
            read(gzip(b"left for the layer reader")),
            gzip(b"left for the layer reader")
        );
    }

    #[test]
    fn every_gzip_member_is_read() {
        let mut blob = gzip(&[b'a'; 1000]);
        blob.extend(gzip(&[b'b'; 3000]));
        let out = read_all(&blob);
        assert_eq!(out.len(), 4000);
        assert!(out[..1000].iter().all(|&b| b == b'a'));
        assert!(out[1000..].iter().all(|&b| b == b'b'));
    }

    #[test]
    fn every_zstd_frame_is_read_and_plain_bytes_pass_through() {
        let first = ruzstd::encoding::compress_to_vec(
            &[b'x'; 500][..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let mut blob = first.clone();
        // A skippable frame between the two.
        blob.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        blob.extend(first);
        assert_eq!(read_all(&blob), vec![b'x'; 1000]);
        assert_eq!(read_all(b"plain tar bytes"), b"plain tar bytes");
        assert_eq!(read_all(b""), b"");
    }
}
