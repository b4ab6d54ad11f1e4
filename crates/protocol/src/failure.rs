//! Which produce errors retrying can fix.
//!
//! Every record decaton-rs writes on a task's behalf (a retry or dead-letter copy, a
//! shaped task, a state change in a changelog) either reaches the broker or fails with a
//! [`KafkaError`]. Some failures pass: a leader moves, a broker restarts, the producer's
//! queue is full, a request times out. Those are [`ErrorClass::Transient`] and the write is
//! tried again with backoff. Others never pass by waiting: a record larger than the
//! broker or producer accepts, a topic that does not exist or that the principal may not
//! write, a record the broker calls invalid, an idempotent producer in a fatal state. Those
//! are [`ErrorClass::Permanent`]: sending the same record again gives the same answer, so
//! the caller must do something else with it (dead-letter it, shorten it, or stop that
//! partition visibly).
//!
//! ```
//! use decaton_protocol::failure::{classify, ErrorClass};
//! use rdkafka::error::{KafkaError, RDKafkaErrorCode};
//!
//! let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
//! assert_eq!(classify(&too_large), ErrorClass::Permanent);
//! let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
//! assert_eq!(classify(&timed_out), ErrorClass::Transient);
//! ```

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Whether trying the same write again can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Retrying later can succeed (broker down, leader moving, queue full, timeout).
    Transient,
    /// The same record will be refused again (too large, no such topic, not authorised,
    /// invalid, fatal producer state).
    Permanent,
}

impl ErrorClass {
    /// A short lower-case name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// The class of an error code returned for a produced record.
pub fn classify_code(code: RDKafkaErrorCode) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match code {
        // Larger than the producer's or the broker's limit.
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::MessageBatchTooLarge
        // Refused by the broker as malformed, or by the client before sending.
        | C::InvalidRecord
        | C::InvalidMessage
        | C::BadMessage
        | C::InvalidArgument
        | C::UnsupportedForMessageFormat
        | C::PolicyViolation
        | C::InvalidRequiredAcks
        // No such topic or partition (librdkafka gives up after waiting for metadata), or
        // a name Kafka does not accept.
        | C::UnknownTopic
        | C::UnknownPartition
        | C::InvalidTopic
        // The principal may not write.
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        // The idempotent or transactional producer cannot go on.
        | C::Fatal
        | C::ProducerFenced
        | C::InvalidProducerEpoch => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// The class of an error returned for a produced record.
pub fn classify(error: &KafkaError) -> ErrorClass {
    match error {
        KafkaError::Transaction(e) if e.is_fatal() => ErrorClass::Permanent,
        e => e
            .rdkafka_error_code()
            .map_or(ErrorClass::Transient, classify_code),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_errors_are_transient_and_refusals_permanent() {
        for code in [
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::NotEnoughReplicas,
        ] {
            assert_eq!(classify_code(code), ErrorClass::Transient, "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::UnknownTopic,
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::Fatal,
        ] {
            assert_eq!(classify_code(code), ErrorClass::Permanent, "{code:?}");
        }
        assert_eq!(
            classify(&KafkaError::Canceled),
            ErrorClass::Transient,
            "no code: tried again"
        );
    }
}
