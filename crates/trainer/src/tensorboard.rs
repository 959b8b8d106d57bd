//! TensorBoard event files, written and read without TensorFlow: TFRecord framing (length,
//! masked CRC-32C of the length, payload, masked CRC-32C of the payload) around `Event`
//! protobufs, the three messages of tensorflow/core/util/event.proto and summary.proto that
//! scalars need, declared with prost.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use prost::Message;

/// `tensorflow.Event`, the fields scalars use.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`; `simple_value` sits in a oneof, so 0.0 is still written.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(oneof = "ValueKind", tags = "2")]
    pub kind: Option<ValueKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ValueKind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
}

/// Appends scalar events to one `events.out.tfevents.*` file.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// A new event file in `dir`, named as TensorBoard's writers name them.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now.as_secs()));
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        writer.write_event(&Event {
            wall_time: wall_time(),
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event holding `scalars` (tag, value) at `step`.
    pub fn scalars(&mut self, step: u64, scalars: &[(String, f64)]) -> Result<()> {
        let value = scalars
            .iter()
            .map(|(tag, value)| SummaryValue {
                tag: tag.clone(),
                kind: Some(ValueKind::SimpleValue(*value as f32)),
            })
            .collect();
        self.write_event(&Event {
            wall_time: wall_time(),
            step: step as i64,
            what: Some(What::Summary(Summary { value })),
        })?;
        // TensorBoard reads files while they grow: every event should be on disk promptly.
        self.out
            .flush()
            .context("cannot write the TensorBoard event file")
    }

    fn write_event(&mut self, event: &Event) -> Result<()> {
        let payload = event.encode_to_vec();
        let length = (payload.len() as u64).to_le_bytes();
        self.out.write_all(&length)?;
        self.out.write_all(&masked_crc(&length).to_le_bytes())?;
        self.out.write_all(&payload)?;
        self.out.write_all(&masked_crc(&payload).to_le_bytes())?;
        Ok(())
    }
}

/// Every event of a file, checking both checksums of every record.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut events = Vec::new();
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        let Some((header, tail)) = rest.split_at_checked(12) else {
            bail!(
                "{}: truncated record header at byte {offset}",
                path.display()
            );
        };
        let length_bytes = &header[..8];
        let length = u64::from_le_bytes(length_bytes.try_into()?) as usize;
        if u32::from_le_bytes(header[8..12].try_into()?) != masked_crc(length_bytes) {
            bail!("{}: bad length checksum at byte {offset}", path.display());
        }
        let Some((payload, tail)) = tail.split_at_checked(length) else {
            bail!("{}: truncated record at byte {offset}", path.display());
        };
        let Some((crc, tail)) = tail.split_at_checked(4) else {
            bail!(
                "{}: truncated record checksum at byte {offset}",
                path.display()
            );
        };
        if u32::from_le_bytes(crc.try_into()?) != masked_crc(payload) {
            bail!("{}: bad payload checksum at byte {offset}", path.display());
        }
        events.push(
            Event::decode(payload)
                .with_context(|| format!("{}: bad event at byte {offset}", path.display()))?,
        );
        rest = tail;
    }
    Ok(events)
}

/// TFRecord's checksum: CRC-32C, rotated and offset so that CRCs of CRCs stay useful.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_is_castagnoli() {
        // The CRC-32C check value (RFC 3720 B.4); CRC-32 (zlib) would give 0xcbf43926.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn scalars_round_trip_including_zero() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(dir.path()).unwrap();
        writer
            .scalars(3, &[("train/loss".into(), 0.5), ("train/lr".into(), 0.0)])
            .unwrap();
        let events = read_events(writer.path()).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        let Some(What::Summary(summary)) = &events[1].what else {
            panic!("second event is not a summary: {:?}", events[1]);
        };
        assert_eq!(events[1].step, 3);
        let values: Vec<_> = summary
            .value
            .iter()
            .map(|v| (v.tag.as_str(), v.kind.clone()))
            .collect();
        assert_eq!(
            values,
            [
                ("train/loss", Some(ValueKind::SimpleValue(0.5))),
                ("train/lr", Some(ValueKind::SimpleValue(0.0)))
            ]
        );
    }

    #[test]
    fn a_flipped_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(dir.path()).unwrap();
        writer.scalars(1, &[("x".into(), 1.0)]).unwrap();
        let path = writer.path().to_path_buf();
        drop(writer);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        let err = read_events(&path).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
    }
}
