//! The GATT layout and advertisement of an LHP/1 lock.
//!
//! This is everything a central can learn about a lock *before* any key is involved, so nothing
//! in here may be secret: the service UUID, the characteristic UUIDs, the read-only info record
//! and the manufacturer data in the advertisement. Both parsers are strict (exact lengths, known
//! version), because they run on bytes from any radio in range.

use thiserror::Error;

use super::ids::{LockId, LockTag};

/// Builds a 128-bit UUID of the LHP/1 family: `6c6f636b-6875-6231-8000-0000000000NN`
/// ("lockhub1" in ASCII in the first eight bytes).
const fn lhp_uuid(n: u8) -> u128 {
    0x6c6f_636b_6875_6231_8000_0000_0000_0000 | n as u128
}

/// The primary service every LHP/1 lock exposes and advertises.
pub const SERVICE_UUID: u128 = lhp_uuid(0x01);
/// Gateway → lock: fragments are written here (write without response).
pub const WRITE_CHAR_UUID: u128 = lhp_uuid(0x02);
/// Lock → gateway: fragments arrive here as notifications.
pub const NOTIFY_CHAR_UUID: u128 = lhp_uuid(0x03);
/// Read-only [`LockInfo`] record.
pub const INFO_CHAR_UUID: u128 = lhp_uuid(0x04);

/// Bluetooth SIG company identifier used in the manufacturer data.
///
/// 0xFFFF is reserved by the SIG for internal and test use; a vendor shipping LHP/1 locks
/// replaces it with its assigned identifier (the gateway accepts either, see
/// [`ManufacturerData::parse`]).
pub const COMPANY_ID: u16 = 0xFFFF;

/// Protocol version spoken by this implementation. There is no negotiation and no fallback:
/// a peer announcing another version is refused (no downgrade).
pub const PROTOCOL_VERSION: u8 = 1;

/// Formats a 128-bit UUID in its canonical textual form (as BlueZ prints it).
pub fn uuid_string(uuid: u128) -> String {
    let b = uuid.to_be_bytes();
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

/// What a lock can do, as announced in its info record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Capabilities {
    /// The lock can pull the latch (open the door), not only retract the bolt.
    pub unlatch: bool,
    /// The lock has a keypad.
    pub keypad: bool,
    /// The lock has a door-position sensor.
    pub door_sensor: bool,
}

impl Capabilities {
    fn to_bits(self) -> u8 {
        u8::from(self.unlatch) | u8::from(self.keypad) << 1 | u8::from(self.door_sensor) << 2
    }

    fn from_bits(bits: u8) -> Result<Self, GattError> {
        if bits & !0b111 != 0 {
            return Err(GattError::ReservedBits);
        }
        Ok(Capabilities { unlatch: bits & 1 != 0, keypad: bits & 2 != 0, door_sensor: bits & 4 != 0 })
    }
}

/// The read-only info characteristic: 14 bytes, see `docs/protocol.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockInfo {
    /// Protocol version; always [`PROTOCOL_VERSION`] once parsed.
    pub protocol_version: u8,
    /// The lock's identifier.
    pub lock_id: LockId,
    /// Firmware version (major, minor, patch).
    pub firmware: (u8, u8, u8),
    /// Whether the lock currently accepts pairing.
    pub pairing_mode: bool,
    /// What the lock can do.
    pub capabilities: Capabilities,
}

impl LockInfo {
    /// Encoded length in bytes.
    pub const LEN: usize = 14;

    /// Encodes the record.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0] = self.protocol_version;
        out[1..9].copy_from_slice(&self.lock_id.0);
        out[9] = self.firmware.0;
        out[10] = self.firmware.1;
        out[11] = self.firmware.2;
        out[12] = u8::from(self.pairing_mode);
        out[13] = self.capabilities.to_bits();
        out
    }

    /// Parses the record, refusing any other version, length or reserved bit.
    pub fn parse(bytes: &[u8]) -> Result<Self, GattError> {
        if bytes.len() != Self::LEN {
            return Err(GattError::Length { expected: Self::LEN, got: bytes.len() });
        }
        if bytes[0] != PROTOCOL_VERSION {
            return Err(GattError::Version(bytes[0]));
        }
        if bytes[12] > 1 {
            return Err(GattError::ReservedBits);
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[1..9]);
        Ok(LockInfo {
            protocol_version: bytes[0],
            lock_id: LockId(id),
            firmware: (bytes[9], bytes[10], bytes[11]),
            pairing_mode: bytes[12] == 1,
            capabilities: Capabilities::from_bits(bytes[13])?,
        })
    }
}

/// The manufacturer-specific advertisement data (after the company id): 6 bytes.
///
/// It has to fit a legacy advertisement beside the service UUID: 31 bytes, less 3 for the
/// flags the controller adds, less 18 for the 128-bit UUID list, less 4 for this structure's
/// length, type and company id. So it carries the lock's [`LockTag`], not its 8-byte id, and
/// the protocol version shares a byte with the flags. [`advertising_data_len`] checks the sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManufacturerData {
    /// The lock's tag (a digest prefix of its id).
    pub tag: LockTag,
    /// The lock accepts pairing right now.
    pub pairing_mode: bool,
    /// The lock has logged events since the paired gateway last read its log.
    pub new_events: bool,
}

impl ManufacturerData {
    /// Encoded length in bytes (without the 2-byte company id, which BlueZ reports apart).
    pub const LEN: usize = 6;
    const FLAG_PAIRING: u8 = 0x01;
    const FLAG_NEW_EVENTS: u8 = 0x02;

    /// The record of lock `lock_id`.
    pub fn new(lock_id: LockId, pairing_mode: bool, new_events: bool) -> Self {
        ManufacturerData { tag: LockTag::of(lock_id), pairing_mode, new_events }
    }

    /// Encodes the advertisement payload.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let mut flags = 0;
        if self.pairing_mode {
            flags |= Self::FLAG_PAIRING;
        }
        if self.new_events {
            flags |= Self::FLAG_NEW_EVENTS;
        }
        out[0] = PROTOCOL_VERSION << 4 | flags;
        out[1..].copy_from_slice(&self.tag.0);
        out
    }

    /// Parses the advertisement payload strictly.
    pub fn parse(bytes: &[u8]) -> Result<Self, GattError> {
        if bytes.len() != Self::LEN {
            return Err(GattError::Length { expected: Self::LEN, got: bytes.len() });
        }
        let (version, flags) = (bytes[0] >> 4, bytes[0] & 0x0f);
        if version != PROTOCOL_VERSION {
            return Err(GattError::Version(version));
        }
        if flags & !(Self::FLAG_PAIRING | Self::FLAG_NEW_EVENTS) != 0 {
            return Err(GattError::ReservedBits);
        }
        let mut tag = [0u8; 5];
        tag.copy_from_slice(&bytes[1..]);
        Ok(ManufacturerData {
            tag: LockTag(tag),
            pairing_mode: flags & Self::FLAG_PAIRING != 0,
            new_events: flags & Self::FLAG_NEW_EVENTS != 0,
        })
    }
}

/// The most advertising data a legacy advertisement carries (Core 5.x, Vol 6, Part B, 2.3.1).
pub const LEGACY_ADVERTISING_DATA_MAX: usize = 31;

/// The length of the advertising data a lock sends: the flags the controller adds (3 bytes;
/// an LE-only controller always adds them), the complete list of 128-bit service UUIDs holding
/// [`SERVICE_UUID`] (2 + 16) and the manufacturer data (2 + company id 2 + the record). The
/// local name goes in the scan response, where BlueZ puts it.
pub const fn advertising_data_len() -> usize {
    3 + (2 + 16) + (2 + 2 + ManufacturerData::LEN)
}

// bluetoothd refuses an advertisement over the limit ("Advertising data too long"), and a real
// lock's controller could not send it: the layout must fit, flags included.
const _: () = assert!(advertising_data_len() <= LEGACY_ADVERTISING_DATA_MAX);

/// Why an info record, advertisement or lock id was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GattError {
    /// The record has the wrong length.
    #[error("record is {got} bytes, expected {expected}")]
    Length {
        /// The length LHP/1 defines.
        expected: usize,
        /// The length received.
        got: usize,
    },
    /// The record announces a protocol version other than ours.
    #[error("unsupported protocol version {0} (this gateway speaks LHP/1 only)")]
    Version(u8),
    /// A reserved bit or value is set.
    #[error("reserved bits set")]
    ReservedBits,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_render_like_bluez() {
        assert_eq!(uuid_string(SERVICE_UUID), "6c6f636b-6875-6231-8000-000000000001");
    }

    #[test]
    fn info_round_trips_and_refuses_other_versions() {
        let info = LockInfo {
            protocol_version: 1,
            lock_id: LockId([1, 2, 3, 4, 5, 6, 7, 8]),
            firmware: (1, 2, 3),
            pairing_mode: true,
            capabilities: Capabilities { unlatch: true, keypad: true, door_sensor: false },
        };
        let bytes = info.encode();
        assert_eq!(LockInfo::parse(&bytes).unwrap(), info);
        let mut v2 = bytes;
        v2[0] = 2;
        assert_eq!(LockInfo::parse(&v2), Err(GattError::Version(2)));
        assert!(LockInfo::parse(&bytes[..13]).is_err());
    }

    #[test]
    fn manufacturer_data_round_trips() {
        let m = ManufacturerData::new(LockId([9; 8]), false, true);
        assert_eq!(ManufacturerData::parse(&m.encode()).unwrap(), m);
        let mut bad = m.encode();
        bad[0] |= 0x08;
        assert_eq!(ManufacturerData::parse(&bad), Err(GattError::ReservedBits));
        let mut v2 = m.encode();
        v2[0] = 0x20 | (v2[0] & 0x0f);
        assert_eq!(ManufacturerData::parse(&v2), Err(GattError::Version(2)));
        assert!(ManufacturerData::parse(&m.encode()[..5]).is_err());
    }

    /// The vector in `docs/protocol.md`: lock 4c48000000000001, pairing mode, no new events.
    #[test]
    fn manufacturer_data_vector() {
        let m = ManufacturerData::new(LockId::parse("4c48000000000001").unwrap(), true, false);
        assert_eq!(hex(&m.encode()), "11dc75a2600f");
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
