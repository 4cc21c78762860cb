//! End-to-end tests: a chunker feeding an assembler, interruptions, and every refusal rule.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::*;
use crate::Error;

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Setup {
    _dir: tempfile::TempDir,
    data: Vec<u8>,
    chunker: SnapshotChunker,
    dest: PathBuf,
}

fn setup(len: usize, chunk_size: u64, seed: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.snap");
    let data = bytes(len, seed);
    fs::write(&src, &data).unwrap();
    let chunker = SnapshotChunker::open(&src, chunk_size).unwrap();
    let dest = dir.path().join("received.snap");
    Setup { _dir: dir, data, chunker, dest }
}

impl Setup {
    fn assembler(&self) -> SnapshotAssembler {
        SnapshotAssembler::create(&self.dest, self.chunker.size(), *self.chunker.sha256()).unwrap()
    }

    /// Sends chunks starting at the assembler's `next_offset`, stopping after `limit` chunks.
    fn send(&self, asm: &mut SnapshotAssembler, limit: usize) {
        for chunk in self.chunker.chunks(asm.next_offset()).unwrap().take(limit) {
            asm.accept_chunk(&chunk.unwrap()).unwrap();
        }
    }

    fn partial(&self) -> PathBuf {
        partial_path_for(&self.dest)
    }

    fn progress(&self) -> PathBuf {
        progress_path_for(&self.dest)
    }
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

fn assert_published(s: &Setup, published: &Path) {
    assert_eq!(published, s.dest);
    assert_eq!(fs::read(&s.dest).unwrap(), s.data);
    assert!(!s.partial().exists(), "partial file left behind");
    assert!(!s.progress().exists(), "progress file left behind");
}

#[test]
fn round_trip_edge_sizes_and_chunk_sizes() {
    for &cs in &[1u64, 7, 4096, 65_536] {
        let c = cs as usize;
        let mut sizes = vec![0, 1, c + 1, 3 * c + 2];
        if c > 1 {
            sizes.extend([c - 1, c]);
        }
        for len in sizes {
            let s = setup(len, cs, len as u64 + cs);
            let mut asm = s.assembler();
            s.send(&mut asm, usize::MAX);
            assert!(asm.is_complete(), "len {len} cs {cs}");
            assert_published(&s, &asm.finish().unwrap());
        }
    }
}

#[test]
fn round_trip_several_megabytes() {
    for &cs in &[1000u64, 65_536, 1 << 20, 8 << 20] {
        let s = setup((3 << 20) + 17, cs, cs);
        let mut asm = s.assembler();
        s.send(&mut asm, usize::MAX);
        assert_published(&s, &asm.finish().unwrap());
    }
}

#[test]
fn final_file_absent_until_finish() {
    let s = setup(10_000, 1024, 1);
    let mut asm = s.assembler();
    for chunk in s.chunker.chunks(0).unwrap() {
        asm.accept_chunk(&chunk.unwrap()).unwrap();
        assert!(!s.dest.exists());
    }
    assert!(!s.dest.exists());
    asm.finish().unwrap();
    assert!(s.dest.exists());
}

#[test]
fn resume_after_drop_continues_where_it_stopped() {
    let s = setup(10_000, 1024, 2);
    let mut asm = s.assembler();
    s.send(&mut asm, 4);
    drop(asm);
    let mut asm = s.assembler();
    assert_eq!(asm.next_offset(), 4096);
    s.send(&mut asm, usize::MAX);
    assert_published(&s, &asm.finish().unwrap());
}

#[test]
fn resume_cuts_a_torn_progress_record() {
    let s = setup(10_000, 1024, 3);
    let mut asm = s.assembler();
    s.send(&mut asm, 5);
    drop(asm);
    let len = file_len(&s.progress());
    OpenOptions::new().write(true).open(s.progress()).unwrap().set_len(len - 5).unwrap();
    let mut asm = s.assembler();
    assert_eq!(asm.next_offset(), 4 * 1024);
    assert_eq!(file_len(&s.partial()), 4 * 1024, "partial file not cut to the good offset");
    assert_eq!(file_len(&s.progress()), len - progress::RECORD_LEN, "torn record not cut");
    s.send(&mut asm, usize::MAX);
    assert_published(&s, &asm.finish().unwrap());
}

#[test]
fn resume_cuts_garbage_after_the_partial_and_progress_files() {
    let s = setup(10_000, 1024, 4);
    let mut asm = s.assembler();
    s.send(&mut asm, 3);
    drop(asm);
    let progress_len = file_len(&s.progress());
    OpenOptions::new().append(true).open(s.partial()).unwrap().write_all(&[0xAB; 777]).unwrap();
    OpenOptions::new().append(true).open(s.progress()).unwrap().write_all(&bytes(40, 9)).unwrap();
    let mut asm = s.assembler();
    assert_eq!(asm.next_offset(), 3 * 1024);
    assert_eq!(file_len(&s.partial()), 3 * 1024);
    assert_eq!(file_len(&s.progress()), progress_len);
    s.send(&mut asm, usize::MAX);
    assert_published(&s, &asm.finish().unwrap());
}

#[test]
fn resume_stops_at_a_chunk_that_fails_its_crc_and_still_finishes() {
    let s = setup(10_000, 1024, 5);
    let mut asm = s.assembler();
    s.send(&mut asm, 6);
    drop(asm);
    // Damage a byte inside the fourth chunk (index 3) on disk.
    let mut partial = fs::read(s.partial()).unwrap();
    partial[3 * 1024 + 100] ^= 0x10;
    fs::write(s.partial(), &partial).unwrap();
    let mut asm = s.assembler();
    assert_eq!(asm.next_offset(), 3 * 1024);
    // The digest must cover only the verified prefix, or finish would fail here.
    s.send(&mut asm, usize::MAX);
    assert_published(&s, &asm.finish().unwrap());
}

#[test]
fn resume_with_partial_file_missing_starts_over() {
    let s = setup(10_000, 1024, 6);
    let mut asm = s.assembler();
    s.send(&mut asm, 3);
    drop(asm);
    fs::remove_file(s.partial()).unwrap();
    let mut asm = s.assembler();
    assert_eq!(asm.next_offset(), 0);
    s.send(&mut asm, usize::MAX);
    assert_published(&s, &asm.finish().unwrap());
}

#[test]
fn leftovers_of_a_different_snapshot_are_discarded() {
    let s = setup(10_000, 1024, 7);
    let mut asm = s.assembler();
    s.send(&mut asm, 5);
    drop(asm);
    let mut other_sha = *s.chunker.sha256();
    other_sha[0] ^= 1;
    let asm = SnapshotAssembler::create(&s.dest, 10_000, other_sha).unwrap();
    assert_eq!(asm.next_offset(), 0);
    assert_eq!(file_len(&s.partial()), 0);
    drop(asm);
    // The same goes for a different size; and the discarded attempt cannot come back.
    let asm = SnapshotAssembler::create(&s.dest, 9_999, *s.chunker.sha256()).unwrap();
    assert_eq!(asm.next_offset(), 0);
    drop(asm);
    assert_eq!(s.assembler().next_offset(), 0);
}

#[test]
fn resume_after_every_chunk_but_before_finish() {
    let s = setup(5000, 1000, 8);
    let mut asm = s.assembler();
    s.send(&mut asm, usize::MAX);
    drop(asm);
    let asm = s.assembler();
    assert!(asm.is_complete());
    assert_eq!(s.chunker.chunks(asm.next_offset()).unwrap().count(), 0);
    assert_published(&s, &asm.finish().unwrap());
}

#[test]
fn out_of_order_chunk_is_refused_and_changes_nothing() {
    let s = setup(5000, 1000, 10);
    let mut asm = s.assembler();
    let err = asm.accept_chunk(&s.chunker.chunk_at(1000).unwrap()).unwrap_err();
    assert!(matches!(err, Error::SnapshotChunk(_)));
    assert!(err.to_string().contains("out of order: expected offset 0, got 1000"), "{err}");
    assert_eq!(asm.next_offset(), 0);
    assert_eq!(file_len(&s.partial()), 0);
    s.send(&mut asm, usize::MAX);
    assert_published(&s, &asm.finish().unwrap());
}

#[test]
fn corrupt_chunk_is_refused_and_nothing_is_written() {
    let s = setup(5000, 1000, 11);
    let mut asm = s.assembler();
    s.send(&mut asm, 1);
    let progress_len = file_len(&s.progress());
    let mut chunk = s.chunker.chunk_at(1000).unwrap();
    chunk.data[17] ^= 0x04;
    let err = asm.accept_chunk(&chunk).unwrap_err();
    assert!(matches!(err, Error::SnapshotChunk(_)));
    assert!(err.to_string().contains("chunk at offset 1000: CRC mismatch"), "{err}");
    assert_eq!(asm.next_offset(), 1000);
    assert_eq!(file_len(&s.partial()), 1000);
    assert_eq!(file_len(&s.progress()), progress_len);
    // A corrupt resend of an already accepted chunk is refused too.
    let mut old = s.chunker.chunk_at(0).unwrap();
    old.crc32c ^= 1;
    assert!(matches!(asm.accept_chunk(&old), Err(Error::SnapshotChunk(_))));
    s.send(&mut asm, usize::MAX);
    assert_published(&s, &asm.finish().unwrap());
}

#[test]
fn identical_duplicate_is_accepted_without_change() {
    let s = setup(5000, 1000, 12);
    let mut asm = s.assembler();
    s.send(&mut asm, 3);
    let progress_len = file_len(&s.progress());
    asm.accept_chunk(&s.chunker.chunk_at(1000).unwrap()).unwrap();
    asm.accept_chunk(&s.chunker.chunk_at(2000).unwrap()).unwrap();
    assert_eq!(asm.next_offset(), 3000);
    assert_eq!(file_len(&s.progress()), progress_len);
    s.send(&mut asm, usize::MAX);
    assert_published(&s, &asm.finish().unwrap());
}

#[test]
fn different_duplicate_is_refused_and_changes_nothing() {
    let s = setup(5000, 1000, 13);
    let mut asm = s.assembler();
    s.send(&mut asm, 3);
    let mut data = s.chunker.chunk_at(1000).unwrap().data;
    data[500] ^= 0xFF;
    let err = asm.accept(1000, &data, crc32c::crc32c(&data)).unwrap_err();
    assert!(matches!(err, Error::SnapshotChunk(_)));
    assert!(err.to_string().contains("offset 1500"), "names the first difference: {err}");
    assert_eq!(asm.next_offset(), 3000);
    assert_eq!(&fs::read(s.partial()).unwrap()[..], &s.data[..3000]);
    s.send(&mut asm, usize::MAX);
    assert_published(&s, &asm.finish().unwrap());
}

#[test]
fn chunk_overlapping_next_offset_writes_only_its_new_tail() {
    let s = setup(5000, 1000, 14);
    let mut asm = s.assembler();
    s.send(&mut asm, 2);
    // A sender with 1500-byte chunks restarts at its boundary 1500 < 2000.
    let data = &s.data[1500..3000];
    asm.accept(1500, data, crc32c::crc32c(data)).unwrap();
    assert_eq!(asm.next_offset(), 3000);
    // But an overlap that disagrees is refused.
    let mut bad = s.data[2500..3500].to_vec();
    bad[0] ^= 1;
    assert!(matches!(asm.accept(2500, &bad, crc32c::crc32c(&bad)), Err(Error::SnapshotChunk(_))));
    assert_eq!(asm.next_offset(), 3000);
    s.send(&mut asm, usize::MAX);
    assert_published(&s, &asm.finish().unwrap());
}

#[test]
fn chunk_past_total_size_is_refused() {
    let s = setup(5000, 1000, 15);
    let mut asm = s.assembler();
    s.send(&mut asm, 4);
    let data = vec![0u8; 1001];
    let err = asm.accept(4000, &data, crc32c::crc32c(&data)).unwrap_err();
    assert!(matches!(err, Error::SnapshotChunk(_)));
    assert!(err.to_string().contains("offset 4000"), "{err}");
    assert_eq!(asm.next_offset(), 4000);
    assert!(matches!(asm.accept(u64::MAX, &[1], crc32c::crc32c(&[1])), Err(Error::SnapshotChunk(_))));
}

#[test]
fn wrong_sha256_fails_finish_and_removes_files() {
    let s = setup(5000, 1000, 16);
    let mut sha = *s.chunker.sha256();
    sha[31] ^= 0x80;
    let mut asm = SnapshotAssembler::create(&s.dest, 5000, sha).unwrap();
    s.send(&mut asm, usize::MAX);
    let err = asm.finish().unwrap_err();
    assert!(matches!(err, Error::SnapshotIntegrity(_)));
    assert!(err.to_string().contains("SHA-256 mismatch"), "{err}");
    assert!(err.to_string().contains(&hex(s.chunker.sha256())), "names the actual digest: {err}");
    assert!(!s.dest.exists());
    assert!(!s.partial().exists());
    assert!(!s.progress().exists());
}

#[test]
fn incomplete_finish_is_refused_and_keeps_files_for_resume() {
    let s = setup(5000, 1000, 17);
    let mut asm = s.assembler();
    s.send(&mut asm, 2);
    assert!(matches!(asm.check_complete(), Err(Error::SnapshotIntegrity(_))));
    let err = asm.finish().unwrap_err();
    assert!(matches!(err, Error::SnapshotIntegrity(_)));
    assert!(err.to_string().contains("incomplete: have 2000 of 5000 bytes"), "{err}");
    assert!(!s.dest.exists());
    let mut asm = s.assembler();
    assert_eq!(asm.next_offset(), 2000);
    s.send(&mut asm, usize::MAX);
    assert_published(&s, &asm.finish().unwrap());
}

#[test]
fn abort_removes_partial_and_progress_files() {
    let s = setup(5000, 1000, 18);
    let mut asm = s.assembler();
    s.send(&mut asm, 2);
    assert!(s.partial().exists() && s.progress().exists());
    asm.abort().unwrap();
    assert!(!s.partial().exists());
    assert!(!s.progress().exists());
    assert!(!s.dest.exists());
    assert_eq!(s.assembler().next_offset(), 0);
}

#[test]
fn finish_replaces_an_older_file_at_the_final_path() {
    let s = setup(3000, 1000, 19);
    fs::write(&s.dest, b"old snapshot").unwrap();
    let mut asm = s.assembler();
    s.send(&mut asm, usize::MAX);
    assert_eq!(fs::read(&s.dest).unwrap(), b"old snapshot");
    assert_published(&s, &asm.finish().unwrap());
}

proptest! {
    // No regression files: a failure prints its minimal input, which is enough to reproduce.
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any file, any chunk size, interrupted after any number of chunks and optionally torn,
    /// ends up byte-identical at the final path.
    #[test]
    fn interrupted_transfer_always_completes(
        len in 0usize..20_000,
        chunk_size in 1u64..6_000,
        stop_after in 0usize..30,
        tear in 0u64..30,
        seed in any::<u64>(),
    ) {
        let s = setup(len, chunk_size, seed);
        let mut asm = s.assembler();
        s.send(&mut asm, stop_after);
        let sent = asm.next_offset();
        drop(asm);
        let progress_len = file_len(&s.progress());
        let torn = progress_len.saturating_sub(tear).max(progress::HEADER_LEN);
        OpenOptions::new().write(true).open(s.progress()).unwrap().set_len(torn).unwrap();
        let mut asm = s.assembler();
        // Every intact record is one chunk; the torn one and anything after it are dropped.
        let intact = (torn - progress::HEADER_LEN) / progress::RECORD_LEN;
        prop_assert_eq!(asm.next_offset(), (intact * chunk_size).min(len as u64));
        prop_assert!(asm.next_offset() <= sent);
        prop_assert_eq!(file_len(&s.partial()), asm.next_offset());
        s.send(&mut asm, usize::MAX);
        let published = asm.finish().unwrap();
        prop_assert_eq!(fs::read(&published).unwrap(), s.data.clone());
        prop_assert!(!s.partial().exists() && !s.progress().exists());
    }
}

#[test]
fn reading_a_chunk_into_a_caller_buffer_matches_chunk_at() {
    let s = setup(10_000, 4096, 7);
    for offset in [0u64, 4096, 8192] {
        let chunk = s.chunker.chunk_at(offset).unwrap();
        let mut buf = vec![0u8; s.chunker.chunk_len(offset).unwrap() as usize];
        let crc = s.chunker.read_chunk_into(offset, &mut buf).unwrap();
        assert_eq!((buf, crc), (chunk.data, chunk.crc32c));
    }
    let mut wrong = vec![0u8; 100];
    assert!(matches!(s.chunker.read_chunk_into(0, &mut wrong), Err(Error::InvalidArgument(_))));
    assert!(matches!(s.chunker.read_chunk_into(100, &mut wrong), Err(Error::InvalidArgument(_))));
}

#[test]
fn a_digest_mismatch_is_still_caught_with_hashing_on_its_own_thread() {
    let s = setup(3 * 4096 + 5, 4096, 9);
    let mut wrong = *s.chunker.sha256();
    wrong[0] ^= 1;
    let mut asm = SnapshotAssembler::create(&s.dest, s.chunker.size(), wrong).unwrap();
    for chunk in s.chunker.chunks(0).unwrap() {
        asm.accept_chunk(&chunk.unwrap()).unwrap();
    }
    assert!(matches!(asm.finish(), Err(Error::SnapshotIntegrity(_))));
    assert!(!s.dest.exists());
}
