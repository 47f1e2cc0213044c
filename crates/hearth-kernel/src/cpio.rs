//! A writer for the `newc` cpio format the kernel unpacks as its initramfs.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the
//! NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes; `TRAILER!!!` ends
//! the archive. Owners are root and mtimes zero, so the same inputs give the same bytes.

use std::io::{self, Write};

pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFCHR: u32 = 0o020000;
/// The newc magic.
pub const MAGIC: &[u8; 6] = b"070701";
/// Name of the last entry.
pub const TRAILER: &str = "TRAILER!!!";

/// Streams an archive to a writer.
#[derive(Debug)]
pub struct Cpio<W: Write> {
    out: W,
    written: u64,
    ino: u32,
}

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Self {
        Self { out, written: 0, ino: 0 }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::other(format!("{name} is too large for cpio (over 4 GiB)")))?;
        self.ino += 1;
        let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        let fields =
            [self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    /// A directory (mode 0755).
    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, S_IFDIR | 0o755, &[], (0, 0))
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (mode & 0o7777), data, (0, 0))
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (mode & 0o7777), &[], (major, minor))
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, &[], (0, 0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One entry read back: name, mode, (rdev major, minor), data.
    pub(crate) type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// An independent newc reader: checks magic and padding, stops at the trailer.
    pub(crate) fn parse(mut b: &[u8]) -> Vec<Entry> {
        let total = b.len();
        let mut out = Vec::new();
        loop {
            let at = total - b.len();
            assert_eq!(at % 4, 0, "entry at {at} is not 4-byte aligned");
            assert_eq!(&b[..6], MAGIC, "bad magic at {at}");
            let field = |i: usize| {
                u32::from_str_radix(
                    std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).expect("ascii"),
                    16,
                )
                .expect("hex")
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6) as usize, field(9), field(10), field(11) as usize);
            let name = std::str::from_utf8(&b[110..110 + namesize - 1]).expect("utf8").to_owned();
            assert_eq!(b[110 + namesize - 1], 0, "name not NUL-terminated");
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = b[data_at..data_at + size].to_vec();
            b = &b[(data_at + size).next_multiple_of(4)..];
            if name == TRAILER {
                assert!(b.is_empty(), "bytes after the trailer");
                return out;
            }
            out.push((name, mode, (rmaj, rmin), data));
        }
    }

    #[test]
    fn archive_parses_back() {
        let mut c = Cpio::new(Vec::new());
        c.dir("dev").expect("dir");
        c.char_dev("dev/console", 0o600, 5, 1).expect("chr");
        c.file("init", 0o755, b"#!/bin/sh\n").expect("file");
        c.file("a", 0o644, b"").expect("empty");
        c.file("abcd/xyz.bin", 0o644, &[7u8; 13]).expect("file");
        let out = c.finish().expect("finish");
        assert_eq!(out.len() % 4, 0);
        let e = parse(&out);
        let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "a", "abcd/xyz.bin"]);
        assert_eq!(e[0].1, S_IFDIR | 0o755);
        assert_eq!((e[1].1, e[1].2), (S_IFCHR | 0o600, (5, 1)));
        assert_eq!((e[2].1, e[2].3.as_slice()), (S_IFREG | 0o755, &b"#!/bin/sh\n"[..]));
        assert_eq!(e[4].3, vec![7u8; 13]);
    }

    #[test]
    fn system_cpio_agrees_when_installed() {
        let mut c = Cpio::new(Vec::new());
        c.dir("a").expect("dir");
        c.file("a/b.txt", 0o644, b"hello").expect("file");
        let out = c.finish().expect("finish");
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("skipping: cpio not installed");
            return;
        };
        child.stdin.take().expect("stdin").write_all(&out).expect("write");
        let listing = child.wait_with_output().expect("cpio");
        assert_eq!(
            String::from_utf8_lossy(&listing.stdout).lines().collect::<Vec<_>>(),
            ["a", "a/b.txt"]
        );
    }
}
