//! The per-layer header the router sends each shard before the rows: what follows (a forward of
//! `rows` rows with `k` slots each, or shutdown), and a sequence number that keeps both sides in
//! lock-step. Eight little-endian u32 (32 bytes), so one tiny NCCL message carries it.

/// Size of one header in bytes.
pub const HEADER_BYTES: usize = 32;

/// What the header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Rows, expert ids and gate weights follow (nothing when rows == 0); partials go back.
    Forward,
    /// The router is leaving: the shard stops its exchange loop.
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub command: Command,
    /// Exchange counter, starting at 0 and +1 per exchange; a gap is a protocol error.
    pub seq: u32,
    /// Decoder layer index (for the shard's weights).
    pub layer: u32,
    /// Rows that follow.
    pub rows: u32,
    /// Expert slots per row.
    pub k: u32,
    /// Values per hidden row.
    pub hidden: u32,
    /// The rows came inside this exchange's slot (slot mode, see `plane`), sent to every shard:
    /// the expert ids are global and name other shards' experts too, which the shard skips.
    /// False: the rows follow in messages of their own and carry only this shard's experts.
    pub in_slot: bool,
}

impl Header {
    /// The first word of every header: "dsv2".
    pub const MAGIC: u32 = 0x6473_7632;

    pub fn encode(&self) -> [u32; HEADER_BYTES / 4] {
        let cmd = match self.command {
            Command::Forward => 1,
            Command::Shutdown => 2,
        };
        [
            Self::MAGIC,
            cmd,
            self.seq,
            self.layer,
            self.rows,
            self.k,
            self.hidden,
            u32::from(self.in_slot),
        ]
    }

    /// Errors name the header field (`magic: ...`): the words come from a peer.
    pub fn decode(w: &[u32; HEADER_BYTES / 4]) -> Result<Self, String> {
        if w[0] != Self::MAGIC {
            return Err(format!("magic: {:#x} is not a dsv2 header", w[0]));
        }
        let command = match w[1] {
            1 => Command::Forward,
            2 => Command::Shutdown,
            c => return Err(format!("command: unknown header command {c}")),
        };
        Ok(Header {
            command,
            seq: w[2],
            layer: w[3],
            rows: w[4],
            k: w[5],
            hidden: w[6],
            in_slot: match w[7] {
                0 => false,
                1 => true,
                f => return Err(format!("in_slot: unknown header payload flag {f}")),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let h = Header {
            command: Command::Forward,
            seq: 7,
            layer: 3,
            rows: 64,
            k: 6,
            hidden: 5120,
            in_slot: false,
        };
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        let inline = Header { in_slot: true, ..h };
        assert_eq!(Header::decode(&inline.encode()), Ok(inline));
        let s = Header {
            command: Command::Shutdown,
            ..h
        };
        assert_eq!(Header::decode(&s.encode()), Ok(s));
        let mut bad = h.encode();
        bad[0] = 0;
        assert!(Header::decode(&bad).unwrap_err().contains("magic"));
        let mut bad = h.encode();
        bad[1] = 9;
        assert!(Header::decode(&bad).unwrap_err().contains("command"));
        let mut bad = h.encode();
        bad[7] = 2;
        assert!(Header::decode(&bad).unwrap_err().contains("payload"));
    }
}
