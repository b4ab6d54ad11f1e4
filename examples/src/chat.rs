//! Generating realistic chat operations.
//!
//! A chat server assigns every operation of a user the next number of that user's
//! sequence: the processors (and the quickstart's checker) use it to see whether a
//! user's operations were handled in order. [`ChatOpGenerator`] plays that server: it
//! picks a user (a few "heavy" users produce a large share of the traffic, as in a real
//! service), an operation type (mostly messages and reads), a fitting target (a room or
//! another user) and a payload, and stamps the user's next sequence number.
//!
//! ```
//! use decaton_examples::chat::ChatOpGenerator;
//!
//! let mut chat = ChatOpGenerator::new(100, 7);
//! let op = chat.next_op();
//! assert_eq!(op.sequence, 0);
//! assert_eq!(chat.expected_counts()[&op.user_id], 1);
//! ```

use std::collections::HashMap;

use decaton_protocol::{ChatOp, OpType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Operation types with their share of the traffic (weights out of 100).
const OP_MIX: [(OpType, u32); 7] = [
    (OpType::SendMessage, 55),
    (OpType::Read, 25),
    (OpType::JoinRoom, 5),
    (OpType::AddFriend, 5),
    (OpType::UpdateProfile, 5),
    (OpType::LeaveRoom, 3),
    (OpType::Block, 2),
];

/// Share of all operations that come from the heaviest 1% of users.
const HEAVY_SHARE: f64 = 0.2;

const WORDS: [&str; 16] = [
    "hello", "lunch", "today", "meeting", "moved", "to", "3pm", "see", "you", "there", "thanks",
    "ok", "sticker", "photo", "lol", "tomorrow",
];

/// The key (and `user_id`) of user number `n`.
pub fn user_id(n: u64) -> String {
    format!("user-{n}")
}

/// Generates chat operations for `users` users with per-user increasing sequence numbers.
#[derive(Debug)]
pub struct ChatOpGenerator {
    rng: StdRng,
    users: u64,
    heavy_users: u64,
    rooms: u64,
    sequence_base: u64,
    next_sequence: Vec<u64>,
    generated: u64,
}

impl ChatOpGenerator {
    /// A generator over users `user-0` .. `user-{users-1}` (at least one), reproducible
    /// from `seed`.
    pub fn new(users: u64, seed: u64) -> Self {
        let users = users.max(1);
        ChatOpGenerator {
            rng: StdRng::seed_from_u64(seed),
            users,
            heavy_users: (users / 100).max(1),
            rooms: (users / 10).max(1),
            sequence_base: 0,
            next_sequence: vec![0; users as usize],
            generated: 0,
        }
    }

    /// Numbers every user's operations from `base` instead of 0, so a second run of the
    /// chat server continues above the sequences of an earlier one (a real server keeps
    /// its counters; this one forgets them when it exits). Call before generating.
    pub fn with_sequence_base(mut self, base: u64) -> Self {
        self.sequence_base = base;
        self.next_sequence.iter_mut().for_each(|s| *s = base);
        self
    }

    /// The next operation: a random user, operation type, target and payload, with that
    /// user's next sequence number and the current time.
    pub fn next_op(&mut self) -> ChatOp {
        let user = if self.rng.random_bool(HEAVY_SHARE) {
            self.rng.random_range(0..self.heavy_users)
        } else {
            self.rng.random_range(0..self.users)
        };
        let sequence = self.next_sequence[user as usize];
        self.next_sequence[user as usize] += 1;
        self.generated += 1;
        let op = self.pick_op();
        let (target_id, payload) = self.target_and_payload(user, op);
        ChatOp {
            user_id: user_id(user),
            op: op as i32,
            target_id,
            payload,
            sequence,
            created_at_millis: decaton_protocol::now_millis(),
        }
    }

    /// How many operations were generated so far.
    pub fn generated(&self) -> u64 {
        self.generated
    }

    /// Key -> number of operations generated for it (with the default base 0, its
    /// sequences are `0..n`: what the order checker expects); users without operations
    /// are left out.
    pub fn expected_counts(&self) -> HashMap<String, u64> {
        self.next_sequence
            .iter()
            .enumerate()
            .map(|(user, n)| (user, n - self.sequence_base))
            .filter(|(_, n)| *n > 0)
            .map(|(user, n)| (user_id(user as u64), n))
            .collect()
    }

    fn pick_op(&mut self) -> OpType {
        let total: u32 = OP_MIX.iter().map(|(_, w)| w).sum();
        let mut roll = self.rng.random_range(0..total);
        for (op, weight) in OP_MIX {
            if roll < weight {
                return op;
            }
            roll -= weight;
        }
        OpType::SendMessage
    }

    fn other_user(&mut self, user: u64) -> String {
        if self.users == 1 {
            return user_id(user);
        }
        let other = (user + self.rng.random_range(1..self.users)) % self.users;
        user_id(other)
    }

    fn room(&mut self) -> String {
        format!("room-{}", self.rng.random_range(0..self.rooms))
    }

    fn target_and_payload(&mut self, user: u64, op: OpType) -> (String, Vec<u8>) {
        match op {
            OpType::SendMessage => {
                let target = if self.rng.random_bool(0.6) {
                    self.room()
                } else {
                    self.other_user(user)
                };
                let words = self.rng.random_range(1..12);
                let text: Vec<&str> = (0..words)
                    .map(|_| WORDS[self.rng.random_range(0..WORDS.len())])
                    .collect();
                (target, text.join(" ").into_bytes())
            }
            OpType::Read => {
                let target = if self.rng.random_bool(0.6) {
                    self.room()
                } else {
                    self.other_user(user)
                };
                let up_to = self.rng.random_range(1..1_000_000u64);
                (target, up_to.to_string().into_bytes())
            }
            OpType::JoinRoom | OpType::LeaveRoom => (self.room(), Vec::new()),
            OpType::AddFriend | OpType::Block => (self.other_user(user), Vec::new()),
            OpType::UpdateProfile | OpType::Unspecified => {
                let status = WORDS[self.rng.random_range(0..WORDS.len())];
                (user_id(user), format!("status={status}").into_bytes())
            }
        }
    }
}

/// A short, log-friendly name of an operation type (`SEND_MESSAGE`, ...); `UNKNOWN` for a
/// value this build does not know.
pub fn op_name(op: i32) -> &'static str {
    OpType::try_from(op)
        .map(|o| o.as_str_name().trim_start_matches("OP_TYPE_"))
        .unwrap_or("UNKNOWN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_increase_per_user_and_counts_add_up() {
        let mut g = ChatOpGenerator::new(50, 1);
        let mut last: HashMap<String, u64> = HashMap::new();
        for _ in 0..5_000 {
            let op = g.next_op();
            let next = last.get(&op.user_id).map_or(0, |s| s + 1);
            assert_eq!(op.sequence, next, "{}", op.user_id);
            last.insert(op.user_id.clone(), op.sequence);
        }
        assert_eq!(g.generated(), 5_000);
        assert_eq!(g.expected_counts().values().sum::<u64>(), 5_000);
        assert_eq!(op_name(OpType::SendMessage as i32), "SEND_MESSAGE");
    }

    #[test]
    fn a_sequence_base_shifts_every_user() {
        let mut g = ChatOpGenerator::new(3, 1).with_sequence_base(1_000);
        let first = g.next_op();
        assert_eq!(first.sequence, 1_000);
        assert_eq!(g.expected_counts()[&first.user_id], 1);
    }
}
