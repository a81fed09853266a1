//! Load harness for the cache server (not a timed test).
//!
//! Starts `graphbuild-cache-server` in-process on a temp directory (or targets `--url`), seeds
//! a pool of blobs of mixed sizes (1 KiB – 4 MiB), then runs N client threads for a fixed
//! duration, each doing GETs (verifying length) and PUTs (full upload: stream, sha256, fsync,
//! rename) of random pool blobs. Prints throughput and p50/p99 latency per operation.
//!
//! ```text
//! cargo run --release --manifest-path bench/cache-server/Cargo.toml -- \
//!     [--clients 32] [--seconds 10] [--write-percent 20] [--url http://host:port]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// Blob sizes and their weights in the pool: many small records, some layer-sized blobs.
const SIZES: &[(usize, usize)] = &[
    (1024, 24),
    (16 * 1024, 16),
    (64 * 1024, 12),
    (256 * 1024, 8),
    (1024 * 1024, 4),
    (4 * 1024 * 1024, 2),
];

struct Options {
    clients: usize,
    seconds: u64,
    write_percent: u64,
    url: Option<String>,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        clients: 32,
        seconds: 10,
        write_percent: 20,
        url: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag}: `{value}` is not a number"))
        };
        match flag.as_str() {
            "--clients" => options.clients = number()? as usize,
            "--seconds" => options.seconds = number()?,
            "--write-percent" => options.write_percent = number()?.min(100),
            "--url" => options.url = Some(value.trim_end_matches('/').to_string()),
            other => return Err(format!("unknown flag `{other}`")),
        }
    }
    Ok(options)
}

struct Blob {
    bytes: Vec<u8>,
    url_path: String,
}

fn make_pool() -> Vec<Blob> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut pool = Vec::new();
    for &(size, count) in SIZES {
        for _ in 0..count {
            let bytes: Vec<u8> = (0..size)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let url_path = format!("/cas/{}", hex::encode(Sha256::digest(&bytes)));
            pool.push(Blob { bytes, url_path });
        }
    }
    pool
}

#[derive(Default)]
struct Samples {
    reads: Vec<Duration>,
    writes: Vec<Duration>,
    read_bytes: u64,
    write_bytes: u64,
    errors: u64,
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index]
}

fn client(base: &str, pool: &[Blob], write_percent: u64, seed: u64, stop: &AtomicBool) -> Samples {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut samples = Samples::default();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut buffer = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let blob = &pool[(state >> 8) as usize % pool.len()];
        let url = format!("{base}{}", blob.url_path);
        let write = state % 100 < write_percent;
        let started = Instant::now();
        let ok = if write {
            match agent.put(&url).send(&blob.bytes[..]) {
                Ok(response) => response.status() == 200,
                Err(_) => false,
            }
        } else {
            match agent.get(&url).call() {
                Ok(mut response) if response.status() == 200 => {
                    let mut reader = response.body_mut().as_reader();
                    let mut received = 0usize;
                    loop {
                        match std::io::Read::read(&mut reader, &mut buffer) {
                            Ok(0) => break,
                            Ok(count) => received += count,
                            Err(_) => break,
                        }
                    }
                    received == blob.bytes.len()
                }
                _ => false,
            }
        };
        let elapsed = started.elapsed();
        if !ok {
            samples.errors += 1;
        } else if write {
            samples.writes.push(elapsed);
            samples.write_bytes += blob.bytes.len() as u64;
        } else {
            samples.reads.push(elapsed);
            samples.read_bytes += blob.bytes.len() as u64;
        }
    }
    samples
}

fn report(name: &str, latencies: &mut [Duration], bytes: u64, seconds: f64) {
    latencies.sort();
    println!(
        "{name:<6} {:>8} requests  {:>9.1} req/s  {:>8.1} MiB/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
        latencies.len(),
        latencies.len() as f64 / seconds,
        bytes as f64 / seconds / (1024.0 * 1024.0),
        percentile(latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(latencies, 0.99).as_secs_f64() * 1000.0,
    );
}

fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    };

    // In-process server unless --url: its own runtime on background threads.
    let store_dir = tempfile::tempdir().expect("temp dir");
    let mut _server_thread = None;
    let base = match &options.url {
        Some(url) => url.clone(),
        None => {
            let mut config = graphbuild_cache_server::ServerConfig::new(store_dir.path());
            config.listen = "127.0.0.1:0".parse().expect("address");
            let (sender, receiver) = std::sync::mpsc::channel();
            _server_thread = Some(std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    let server = graphbuild_cache_server::bind(config).await.expect("bind");
                    let _ = sender.send(server.local_addr());
                    server.run(std::future::pending()).await.expect("serve");
                });
            }));
            format!("http://{}", receiver.recv().expect("server address"))
        }
    };

    let pool = Arc::new(make_pool());
    let pool_bytes: usize = pool.iter().map(|blob| blob.bytes.len()).sum();
    println!(
        "server {base}: {} clients, {} s, {} % writes, pool of {} blobs ({:.1} MiB, 1 KiB - 4 MiB)",
        options.clients,
        options.seconds,
        options.write_percent,
        pool.len(),
        pool_bytes as f64 / (1024.0 * 1024.0)
    );
    let seeder: ureq::Agent = ureq::Agent::config_builder().build().into();
    for blob in pool.iter() {
        seeder
            .put(format!("{base}{}", blob.url_path))
            .send(&blob.bytes[..])
            .expect("seeding the pool");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let clients: Vec<_> = (0..options.clients)
        .map(|index| {
            let (base, pool, stop) = (base.clone(), pool.clone(), stop.clone());
            let write_percent = options.write_percent;
            std::thread::spawn(move || client(&base, &pool, write_percent, index as u64 + 1, &stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(options.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut total = Samples::default();
    for client in clients {
        let samples = client.join().expect("client thread");
        total.reads.extend(samples.reads);
        total.writes.extend(samples.writes);
        total.read_bytes += samples.read_bytes;
        total.write_bytes += samples.write_bytes;
        total.errors += samples.errors;
    }
    let seconds = started.elapsed().as_secs_f64();
    report("GET", &mut total.reads, total.read_bytes, seconds);
    report("PUT", &mut total.writes, total.write_bytes, seconds);
    let mut all: Vec<Duration> = total.reads.iter().chain(&total.writes).copied().collect();
    report(
        "all",
        &mut all,
        total.read_bytes + total.write_bytes,
        seconds,
    );
    println!("errors {}", total.errors);
}
