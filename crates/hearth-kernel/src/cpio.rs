//! A writer for the `newc` cpio format the kernel unpacks as its initramfs.

use std::io::{self, Write};

/// Builds an archive in memory.
#[derive(Debug, Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, &[], (0, 0));
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, S_IFREG | (mode & 0o7777), data, (0, 0));
    }

    pub fn char_dev(&mut self, name: &str, mode: u32, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | (mode & 0o7777), &[], (major, minor));
    }

    /// Adds the trailer and writes the archive.
    pub fn finish(mut self, mut out: impl Write) -> io::Result<()> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        out.write_all(&self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_reads_back_with_the_system_tool() {
        let mut c = Cpio::new();
        c.dir("dev");
        c.file("init", 0o755, b"#!/bin/sh\n");
        c.dir("a");
        c.file("a/b.txt", 0o644, b"hello");
        let mut out = Vec::new();
        c.finish(&mut out).expect("finish");
        assert!(out.len().is_multiple_of(4));
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
        assert_eq!(String::from_utf8_lossy(&listing.stdout).lines().collect::<Vec<_>>(), ["dev", "init", "a", "a/b.txt"]);
    }
}
