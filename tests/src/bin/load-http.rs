//! `load-http`: a small closed-loop HTTP load driver for `scripts/load-serve.sh` and
//! `scripts/load-proxy.sh`. Each of `--concurrency` workers sends `GET <url>` back to back for
//! `--seconds`; the `Authorization` header cycles through the lines of `--tokens-file`, and every
//! `--hot-every`-th request carries `--hot-token` instead (the one token whose answers must keep
//! coming from the sidecar's cache). Prints requests, requests/s, statuses, errors and latency
//! percentiles, overall and for the hot token. Tokens are never printed.
//!
//! ```text
//! load-http URL [--concurrency 32] [--seconds 20] [--tokens-file FILE]
//!               [--hot-token TOKEN --hot-every 10] [--expect 200]
//! ```
//! Exit status 1 when any request failed: a transport error, or a status other than `--expect`
//! (only hot requests count when both `--hot-token` and `--tokens-file` are given, since the
//! other tokens may be refused on purpose).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// What the command line asks for.
struct Options {
    url: String,
    concurrency: usize,
    duration: Duration,
    tokens: Vec<String>,
    hot_token: Option<String>,
    hot_every: usize,
    expect: u16,
}

fn options() -> anyhow::Result<Options> {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        url: String::new(),
        concurrency: 32,
        duration: Duration::from_secs(20),
        tokens: Vec::new(),
        hot_token: None,
        hot_every: 10,
        expect: 200,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--concurrency" => options.concurrency = value()?.parse()?,
            "--seconds" => options.duration = Duration::from_secs(value()?.parse()?),
            "--tokens-file" => {
                let path = value()?;
                let text =
                    std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
                options.tokens = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            "--hot-token" => options.hot_token = Some(value()?),
            "--hot-every" => options.hot_every = value()?.parse()?,
            "--expect" => options.expect = value()?.parse()?,
            "-h" | "--help" => bail!("usage: see the header of tests/src/bin/load-http.rs"),
            url if !url.starts_with("--") && options.url.is_empty() => options.url = url.to_owned(),
            other => bail!("unexpected argument {other:?}"),
        }
    }
    if options.url.is_empty() {
        bail!("a URL is required");
    }
    if options.concurrency == 0 || options.hot_every == 0 {
        bail!("--concurrency and --hot-every must be at least 1");
    }
    Ok(options)
}

/// What one worker saw.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    hot_latencies: Vec<Duration>,
    statuses: BTreeMap<u16, usize>,
    hot_statuses: BTreeMap<u16, usize>,
    transport_errors: usize,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.hot_latencies.extend(other.hot_latencies);
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        for (status, n) in other.hot_statuses {
            *self.hot_statuses.entry(status).or_default() += n;
        }
        self.transport_errors += other.transport_errors;
    }
}

async fn worker(
    client: reqwest::Client,
    options: Arc<Options>,
    next: Arc<AtomicUsize>,
    until: Instant,
) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < until {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let hot = options.hot_token.is_some() && n.is_multiple_of(options.hot_every);
        let token = match (&options.hot_token, options.tokens.is_empty()) {
            (Some(hot_token), _) if hot => Some(hot_token.as_str()),
            (_, false) => Some(options.tokens[n % options.tokens.len()].as_str()),
            (hot_token, true) => hot_token.as_deref(),
        };
        let mut request = client.get(&options.url);
        if let Some(token) = token {
            request = request.header("Authorization", token);
        }
        let started = Instant::now();
        let result = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                response.bytes().await.map(|_| status)
            }
            Err(error) => Err(error),
        };
        let latency = started.elapsed();
        match result {
            Ok(status) => {
                tally.latencies.push(latency);
                *tally.statuses.entry(status).or_default() += 1;
                if hot {
                    tally.hot_latencies.push(latency);
                    *tally.hot_statuses.entry(status).or_default() += 1;
                }
            }
            Err(_) => tally.transport_errors += 1,
        }
    }
    tally
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn run(options: Options) -> anyhow::Result<bool> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let options = Arc::new(options);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let until = started + options.duration;
    let workers: Vec<_> = (0..options.concurrency)
        .map(|_| {
            tokio::spawn(worker(
                client.clone(),
                Arc::clone(&options),
                Arc::clone(&next),
                until,
            ))
        })
        .collect();
    let mut tally = Tally::default();
    for worker in workers {
        tally.merge(worker.await?);
    }
    let elapsed = started.elapsed();
    tally.latencies.sort();
    tally.hot_latencies.sort();
    let answered = tally.latencies.len();
    let unexpected: usize = tally
        .statuses
        .iter()
        .filter(|(status, _)| **status != options.expect)
        .map(|(_, n)| n)
        .sum();
    let hot_unexpected: usize = tally
        .hot_statuses
        .iter()
        .filter(|(status, _)| **status != options.expect)
        .map(|(_, n)| n)
        .sum();
    println!("url              {}", options.url);
    println!(
        "clients          {} for {:.1} s",
        options.concurrency,
        elapsed.as_secs_f64()
    );
    let others_sent = answered + tally.transport_errors - tally.hot_latencies.len();
    println!(
        "distinct tokens  {} sent ({} in the list)",
        others_sent.min(options.tokens.len()) + usize::from(options.hot_token.is_some()),
        options.tokens.len() + usize::from(options.hot_token.is_some())
    );
    println!("requests         {answered} answered");
    println!(
        "requests/s       {:.0}",
        answered as f64 / elapsed.as_secs_f64()
    );
    println!("statuses         {:?}", tally.statuses);
    println!("transport errors {}", tally.transport_errors);
    println!(
        "latency          p50 {}  p99 {}  max {}",
        ms(percentile(&tally.latencies, 0.50)),
        ms(percentile(&tally.latencies, 0.99)),
        ms(tally.latencies.last().copied().unwrap_or_default())
    );
    if options.hot_token.is_some() {
        println!(
            "hot token        {} requests, statuses {:?}, p50 {}  p99 {}",
            tally.hot_latencies.len(),
            tally.hot_statuses,
            ms(percentile(&tally.hot_latencies, 0.50)),
            ms(percentile(&tally.hot_latencies, 0.99))
        );
    }
    // With a hot token next to a tokens file, the other tokens may be refused on purpose: only
    // the hot token must always be answered with `--expect`. Otherwise every request must.
    let errors = tally.transport_errors
        + if options.hot_token.is_some() && !options.tokens.is_empty() {
            hot_unexpected
        } else {
            unexpected
        };
    println!("errors           {errors}");
    Ok(errors == 0)
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match options() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("load-http: {error:#}");
            return ExitCode::from(2);
        }
    };
    match run(options).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("load-http: {error:#}");
            ExitCode::FAILURE
        }
    }
}
