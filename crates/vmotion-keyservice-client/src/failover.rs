//! Several replicas behind one client: which failures move a call to another replica,
//! and the schedule that bounds it.
//!
//! A call starts at the replica that last answered and, on a failure, moves on to the
//! next one (in the order the URLs were given, wrapping round), pausing between rounds
//! over all of them, until it has an answer, has made its last round, or its time budget
//! is spent ([`Schedule`]). What a failure proves about the request decides whether it
//! may be sent again ([`Failure`]):
//!
//! | failure | proves | sent again |
//! |---|---|---|
//! | TCP connect refused or failed, TLS handshake failed, the connection found closed before the request was written | the request never left this host | for every call, fetching a key included |
//! | timeout, the connection dropped mid-exchange; `unavailable`, `too_many_connections`, `rate_limited`, `internal` | nothing: the request may have reached a replica | only for idempotent calls ([`Idempotence`]); never for fetching a key, which is single-use |
//! | any other answer (`bad_request`, `forbidden`, `not_found`, `conflict`, `already_fetched`, `expired`, `vm_in_flight`, `busy`, an answer that does not parse) | the replica answered | never: returned at once |
//!
//! A replica that answered "not now" (`unavailable`, `too_many_connections`,
//! `rate_limited`, `internal`) is not asked again within the same call: it is alive and
//! asked the caller to back off, and the caller's own retries (the arbiter's, the
//! receiver's refresh) come later. A replica whose TLS handshake was refused by rustls
//! (a certificate it does not accept, or one it presents that this host does not) is not
//! asked again either: it would refuse the same way. A replica that failed any other way
//! may be asked again in a later round.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::ClientError;
use crate::api::ErrorCode;

/// Whether a call may be sent again after a failure that may have reached a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Idempotence {
    /// Sending it twice has the effect of sending it once: register, read a host, create
    /// (by its request id), record and read an outcome.
    Idempotent,
    /// Fetching a key: the first request that reaches the service spends it.
    Once,
}

/// What a failure proves about the request, and where the call may go next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The request never left this host: send it anywhere, this replica again later.
    Unsent,
    /// The TLS handshake was refused (by either side's certificate check): the request
    /// never left, and this replica would refuse it the same way again.
    Rejected,
    /// The request may have reached the replica and taken effect; this replica may be
    /// asked again in a later round.
    Lost,
    /// The replica answered "not now" (it may have acted, for all the client knows): ask
    /// another, not this one again within the call.
    NotNow,
    /// An answer: the call's result.
    Answer,
}

impl Failure {
    /// Whether the request may have reached a replica.
    pub(crate) fn maybe_sent(self) -> bool {
        matches!(self, Self::Lost | Self::NotNow)
    }
}

/// What `e` proves about the request that failed with it.
pub(crate) fn classify(e: &ClientError) -> Failure {
    match e {
        ClientError::Connect { .. } | ClientError::Closed(_) => Failure::Unsent,
        ClientError::Handshake { source, .. } => {
            let by_rustls = source
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
            if by_rustls {
                Failure::Rejected
            } else {
                Failure::Unsent
            }
        }
        ClientError::Http(_) | ClientError::Timeout(_) => Failure::Lost,
        ClientError::Refused { code, .. } => match code {
            ErrorCode::Unavailable
            | ErrorCode::TooManyConnections
            | ErrorCode::RateLimited
            | ErrorCode::Internal => Failure::NotNow,
            ErrorCode::BadRequest
            | ErrorCode::Forbidden
            | ErrorCode::NotFound
            | ErrorCode::AlreadyFetched
            | ErrorCode::Expired
            | ErrorCode::Conflict
            | ErrorCode::VmInFlight
            | ErrorCode::HostDraining
            | ErrorCode::Busy => Failure::Answer,
        },
        // A wrapped failure was already classified by the call that wrapped it.
        ClientError::Exhausted { .. }
        | ClientError::KeyStateUnknown(_)
        | ClientError::Url(_)
        | ClientError::Tls(_)
        | ClientError::NoRandomness
        | ClientError::BadResponse(_) => Failure::Answer,
    }
}

/// The limits of one call.
///
/// The defaults: 10 s per call, every attempt and pause included; with several replicas
/// each attempt gets at most 4 s (so a hung replica leaves its turn with time for the
/// others, and within the driver's 5 s bound on an arbiter request), with one replica the
/// whole budget left; connecting and the TLS handshake at most 2 s of an attempt (a
/// replica whose address black-holes SYNs gives its turn up early); at most 3 rounds over
/// the replicas, 50 ms between the first and the second, doubling (up to 1 s).
///
/// Why rounds are counted as well as time: a service whose every replica refuses
/// connections three times over is down, and saying so within about 150 ms leaves the
/// decision to the caller's own retries and deadlines: the driver checks the arbiter
/// inline before it pauses the VM, and a call that kept retrying a dead service would
/// stall the migration until the destination gave up on it. The time budget bounds the
/// other case, replicas that take a request and never answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Schedule {
    /// One call, every attempt and pause included.
    pub(crate) budget: Duration,
    /// Rounds over all replicas, at most.
    pub(crate) rounds: u32,
    /// One attempt, when there is another replica to try.
    pub(crate) attempt: Duration,
    /// Connecting and the TLS handshake, within an attempt.
    pub(crate) connect: Duration,
    /// The pause after the first round over all replicas.
    pub(crate) first_pause: Duration,
    /// The longest pause between rounds.
    pub(crate) max_pause: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            budget: Duration::from_secs(10),
            rounds: 3,
            attempt: Duration::from_secs(4),
            connect: Duration::from_secs(2),
            first_pause: Duration::from_millis(50),
            max_pause: Duration::from_secs(1),
        }
    }
}

/// One call's walk over the replicas: which to try next, when, and for how long.
#[derive(Debug)]
struct Walk {
    started: Instant,
    deadline: Instant,
    /// Replicas not to ask again within this call.
    done_with: Vec<bool>,
    /// Replicas asked in this round.
    asked: Vec<bool>,
    /// Rounds finished.
    rounds: u32,
    pause: Duration,
    attempts: u32,
}

/// Where a call goes after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// To this replica, after this pause.
    Ask(usize, Duration),
    /// Nowhere: every replica answered "not now" or refused the handshake.
    NoneLeft,
    /// Nowhere: the last round is over.
    LastRound,
}

impl Walk {
    fn new(schedule: &Schedule, replicas: usize) -> Self {
        let started = Instant::now();
        Self {
            started,
            deadline: started + schedule.budget,
            done_with: vec![false; replicas],
            asked: vec![false; replicas],
            rounds: 0,
            pause: schedule.first_pause,
            attempts: 0,
        }
    }

    /// The next replica after `i` still worth asking, and the pause before asking it.
    fn next(&mut self, i: usize, schedule: &Schedule) -> Next {
        let n = self.done_with.len();
        let Some(next) = (1..=n).map(|k| (i + k) % n).find(|&j| !self.done_with[j]) else {
            return Next::NoneLeft;
        };
        self.asked[i] = true;
        if !self.asked[next] {
            return Next::Ask(next, Duration::ZERO);
        }
        // Every replica still worth asking was asked in this round.
        self.asked.fill(false);
        self.rounds += 1;
        if self.rounds >= schedule.rounds {
            return Next::LastRound;
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(schedule.max_pause);
        Next::Ask(next, pause)
    }

    fn exhausted(&self, names: &[String], last: ClientError) -> ClientError {
        ClientError::Exhausted {
            attempts: self.attempts,
            within: self.started.elapsed(),
            replicas: names.join(","),
            last: Box::new(last),
        }
    }
}

/// Runs `attempt(replica, time limit)` from replica `first` on, over `names.len()`
/// replicas, as the module's table says. Returns the replica that answered and its
/// answer, or the error to report: an answer, a failure that may have reached a replica
/// of a call that must not be sent twice, the last failure when no replica is left to
/// ask, or [`ClientError::Exhausted`] after the last round or when the budget is spent.
pub(crate) async fn call<T, F, Fut>(
    schedule: &Schedule,
    names: &[String],
    first: usize,
    idempotence: Idempotence,
    mut attempt: F,
) -> Result<(usize, T), ClientError>
where
    F: FnMut(usize, Duration) -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut walk = Walk::new(schedule, names.len());
    let mut i = first % names.len();
    loop {
        let left = walk.deadline.saturating_duration_since(Instant::now());
        let limit = if names.len() > 1 {
            left.min(schedule.attempt)
        } else {
            left
        };
        walk.attempts += 1;
        let e = match attempt(i, limit).await {
            Ok(answer) => return Ok((i, answer)),
            Err(e) => e,
        };
        let failure = classify(&e);
        if failure == Failure::Answer || (failure.maybe_sent() && idempotence == Idempotence::Once)
        {
            return Err(e);
        }
        if matches!(failure, Failure::NotNow | Failure::Rejected) {
            walk.done_with[i] = true;
        }
        let (next, pause) = match walk.next(i, schedule) {
            Next::Ask(next, pause) => (next, pause),
            Next::NoneLeft => return Err(e),
            Next::LastRound => return Err(walk.exhausted(names, e)),
        };
        if Instant::now() + pause >= walk.deadline {
            return Err(walk.exhausted(names, e));
        }
        if next == i {
            tracing::debug!(replica = %names[i], reason = %e, ?pause, "key service call failed; again");
        } else {
            tracing::info!(
                replica = %names[i],
                next = %names[next],
                reason = %e,
                "key service replica failed; trying the next"
            );
        }
        tokio::time::sleep(pause).await;
        i = next;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn refused(code: ErrorCode) -> ClientError {
        ClientError::Refused {
            status: code.status(),
            code,
            message: "no".into(),
            migration_id: None,
            retry_after: None,
        }
    }

    fn refused_connect() -> ClientError {
        ClientError::Connect {
            addr: "127.0.0.1:1".into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        }
    }

    #[test]
    fn failures_are_classified_by_what_they_prove() {
        use Failure::*;
        let io = |k: std::io::ErrorKind| std::io::Error::from(k);
        let cases = [
            (refused_connect(), Unsent),
            (
                ClientError::Handshake {
                    addr: "ks1:7443".into(),
                    source: io(std::io::ErrorKind::UnexpectedEof),
                },
                Unsent,
            ),
            (
                ClientError::Handshake {
                    addr: "ks1:7443".into(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
                    ),
                },
                Rejected,
            ),
            (ClientError::Timeout(Duration::from_secs(4)), Lost),
            (refused(ErrorCode::Unavailable), NotNow),
            (refused(ErrorCode::TooManyConnections), NotNow),
            (refused(ErrorCode::RateLimited), NotNow),
            (refused(ErrorCode::Internal), NotNow),
            (refused(ErrorCode::BadRequest), Answer),
            (refused(ErrorCode::Forbidden), Answer),
            (refused(ErrorCode::NotFound), Answer),
            (refused(ErrorCode::Conflict), Answer),
            (refused(ErrorCode::AlreadyFetched), Answer),
            (refused(ErrorCode::Expired), Answer),
            (refused(ErrorCode::VmInFlight), Answer),
            (refused(ErrorCode::Busy), Answer),
            (ClientError::BadResponse("not json".into()), Answer),
            (ClientError::Url("bad".into()), Answer),
        ];
        for (e, want) in cases {
            assert_eq!(classify(&e), want, "{e}");
        }
        assert!(Lost.maybe_sent() && NotNow.maybe_sent());
        assert!(!Unsent.maybe_sent() && !Rejected.maybe_sent());
    }

    fn quick() -> Schedule {
        Schedule {
            budget: Duration::from_millis(400),
            rounds: 3,
            attempt: Duration::from_millis(100),
            connect: Duration::from_millis(50),
            first_pause: Duration::from_millis(10),
            max_pause: Duration::from_millis(40),
        }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("https://ks{i}:7443")).collect()
    }

    /// Runs `call` with attempts that answer from `script(replica, attempt number)`;
    /// returns its result and the replicas tried, in order, with their time limits.
    async fn run(
        replicas: usize,
        first: usize,
        idempotence: Idempotence,
        script: impl Fn(usize, usize) -> Result<&'static str, ClientError>,
    ) -> (
        Result<(usize, &'static str), ClientError>,
        Vec<(usize, Duration)>,
    ) {
        let tried = Mutex::new(Vec::new());
        let r = call(
            &quick(),
            &names(replicas),
            first,
            idempotence,
            |i, limit| {
                let mut t = tried.lock().unwrap();
                t.push((i, limit));
                let answer = script(i, t.len());
                async move { answer }
            },
        )
        .await;
        (r, tried.into_inner().unwrap())
    }

    fn order(tried: &[(usize, Duration)]) -> Vec<usize> {
        tried.iter().map(|(i, _)| *i).collect()
    }

    #[tokio::test]
    async fn an_unsent_request_moves_on_for_every_call() {
        for idempotence in [Idempotence::Idempotent, Idempotence::Once] {
            let (r, tried) = run(3, 1, idempotence, |i, _| {
                if i == 2 {
                    Ok("served")
                } else {
                    Err(refused_connect())
                }
            })
            .await;
            assert_eq!(r.unwrap(), (2, "served"));
            assert_eq!(
                order(&tried),
                [1, 2],
                "starts at the replica that last worked"
            );
        }
    }

    #[tokio::test]
    async fn a_request_that_may_have_arrived_is_sent_again_only_if_idempotent() {
        let lost: [fn() -> ClientError; 4] = [
            || ClientError::Timeout(Duration::from_millis(100)),
            || refused(ErrorCode::Unavailable),
            || refused(ErrorCode::TooManyConnections),
            || refused(ErrorCode::RateLimited),
        ];
        for make in lost {
            let script = |i: usize, _| if i == 0 { Err(make()) } else { Ok("served") };
            let (r, tried) = run(2, 0, Idempotence::Idempotent, script).await;
            assert_eq!(r.unwrap(), (1, "served"), "{}", make());
            assert_eq!(order(&tried), [0, 1]);
            let (r, tried) = run(2, 0, Idempotence::Once, script).await;
            assert_eq!(r.unwrap_err().to_string(), make().to_string());
            assert_eq!(
                order(&tried),
                [0],
                "a key fetch is never sent twice: {}",
                make()
            );
        }
    }

    #[tokio::test]
    async fn answers_come_back_at_once() {
        for code in [ErrorCode::Busy, ErrorCode::VmInFlight, ErrorCode::NotFound] {
            let (r, tried) = run(3, 0, Idempotence::Idempotent, |_, _| Err(refused(code))).await;
            assert_eq!(r.unwrap_err().code(), Some(code));
            assert_eq!(tried.len(), 1);
        }
    }

    #[tokio::test]
    async fn a_replica_that_said_not_now_is_not_asked_again_within_the_call() {
        // Alone: its answer stands.
        let (r, tried) = run(1, 0, Idempotence::Idempotent, |_, _| {
            Err(refused(ErrorCode::RateLimited))
        })
        .await;
        assert_eq!(r.unwrap_err().code(), Some(ErrorCode::RateLimited));
        assert_eq!(tried.len(), 1);
        // With another that fails to connect: only the other is asked again, a round each.
        let (r, tried) = run(2, 0, Idempotence::Idempotent, |i, _| {
            Err(if i == 0 {
                refused(ErrorCode::Unavailable)
            } else {
                refused_connect()
            })
        })
        .await;
        assert!(matches!(r, Err(ClientError::Exhausted { .. })), "{r:?}");
        assert_eq!(order(&tried), [0, 1, 1, 1]);
    }

    /// Every replica refuses connections: three rounds, 10 then 20 ms apart, and the
    /// call reports the service down at once rather than using its time budget.
    #[tokio::test]
    async fn a_service_down_everywhere_is_reported_after_the_last_round() {
        let started = Instant::now();
        let (r, tried) = run(2, 1, Idempotence::Once, |_, _| Err(refused_connect())).await;
        let took = started.elapsed();
        let Err(ClientError::Exhausted {
            attempts,
            last,
            replicas,
            ..
        }) = r
        else {
            panic!("{r:?}")
        };
        assert_eq!(order(&tried), [1, 0, 1, 0, 1, 0]);
        assert_eq!(attempts, 6);
        assert!(matches!(*last, ClientError::Connect { .. }));
        assert_eq!(replicas, "https://ks0:7443,https://ks1:7443");
        assert!(
            took >= Duration::from_millis(30),
            "paused between rounds: {took:?}"
        );
        assert!(took < quick().budget / 2, "{took:?}");
    }

    /// Replicas that take the request and never answer: each attempt is cut at the
    /// per-attempt limit (or what is left), and the budget bounds the call.
    #[tokio::test]
    async fn the_budget_bounds_a_call_to_hung_replicas() {
        let started = Instant::now();
        let tried = Mutex::new(Vec::new());
        let r: Result<(usize, ()), _> = call(
            &quick(),
            &names(2),
            0,
            Idempotence::Idempotent,
            |i, limit| {
                tried.lock().unwrap().push((i, limit));
                async move {
                    tokio::time::sleep(limit).await;
                    Err(ClientError::Timeout(limit))
                }
            },
        )
        .await;
        let took = started.elapsed();
        assert!(matches!(r, Err(ClientError::Exhausted { .. })), "{r:?}");
        let budget = quick().budget;
        assert!(took >= budget - Duration::from_millis(20), "{took:?}");
        assert!(took <= budget + Duration::from_millis(50), "{took:?}");
        let tried = tried.into_inner().unwrap();
        assert_eq!(order(&tried)[..4], [0, 1, 0, 1], "turns taken: {tried:?}");
        assert!(tried.iter().all(|(_, limit)| *limit <= quick().attempt));
    }

    #[tokio::test]
    async fn one_replica_gets_the_whole_budget_left_per_attempt() {
        let (_, tried) = run(1, 0, Idempotence::Idempotent, |_, n| {
            if n < 3 {
                Err(ClientError::Timeout(Duration::ZERO))
            } else {
                Ok("served")
            }
        })
        .await;
        assert_eq!(tried.len(), 3);
        assert!(tried[0].1 > quick().attempt, "{:?}", tried[0].1);
        assert!(tried[1].1 < tried[0].1 && tried[2].1 < tried[1].1);
    }
}
