//! What a child process printed: a bounded tail of its lines (both streams, in arrival order)
//! for diagnostics and exit checks, and all-time counts of marker lines the caller registered.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Which pipe a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// The output of one child process, over all its launches (a restart keeps appending). Cloning
/// shares it.
#[derive(Clone, Debug)]
pub struct Output(Arc<Mutex<Inner>>);

#[derive(Debug)]
struct Inner {
    /// `(sequence number, stream, line)`; at most `keep` entries, the oldest dropped first.
    tail: VecDeque<(u64, Stream, String)>,
    keep: usize,
    /// Sequence number of the next line.
    next: u64,
    /// `(marker, lines holding it so far)`: counted over the whole life, never capped.
    markers: Vec<(String, usize)>,
}

impl Output {
    pub(crate) fn new(keep: usize, markers: &[String]) -> Output {
        Output(Arc::new(Mutex::new(Inner {
            tail: VecDeque::new(),
            keep: keep.max(1),
            next: 0,
            markers: markers.iter().map(|m| (m.clone(), 0)).collect(),
        })))
    }

    // A reader thread that panicked while holding the lock left whole lines only: keep going.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, stream: Stream, line: String) {
        let mut inner = self.lock();
        for (marker, count) in &mut inner.markers {
            if line.contains(marker.as_str()) {
                *count += 1;
            }
        }
        if inner.tail.len() == inner.keep {
            inner.tail.pop_front();
        }
        let seq = inner.next;
        inner.next += 1;
        inner.tail.push_back((seq, stream, line));
    }

    /// The sequence number the next line will get: lines from here on are "after the mark".
    pub(crate) fn mark(&self) -> u64 {
        self.lock().next
    }

    /// The kept lines of `stream` printed since `mark`, each ending in a newline.
    pub(crate) fn since(&self, mark: u64, stream: Stream) -> String {
        let inner = self.lock();
        let mut text = String::new();
        for (_, _, line) in inner
            .tail
            .iter()
            .filter(|(seq, s, _)| *seq >= mark && *s == stream)
        {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    /// The kept lines of both streams, oldest first, joined by newlines.
    pub fn tail(&self) -> String {
        let inner = self.lock();
        inner
            .tail
            .iter()
            .map(|(_, _, line)| line.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// How many lines holding `marker` were printed so far, over every launch; `None` when the
    /// marker was not registered at build time (only registered markers are counted, so the
    /// count stays exact however long the process runs while memory stays bounded).
    pub fn count(&self, marker: &str) -> Option<usize> {
        self.lock()
            .markers
            .iter()
            .find(|(m, _)| m == marker)
            .map(|(_, n)| *n)
    }
}

/// Reads `reader` line by line on a thread until the pipe closes (the process exited): every
/// line goes to `output`, and to `on_line` first. Keeps reading whatever `on_line` does, so the
/// child never blocks on a full pipe.
pub(crate) fn drain<R, F>(
    reader: R,
    stream: Stream,
    output: Output,
    mut on_line: F,
) -> JoinHandle<()>
where
    R: Read + Send + 'static,
    F: FnMut(&str) + Send + 'static,
{
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            on_line(&line);
            output.push(stream, line);
        }
    })
}

/// A process started by [`spawn_watched`]: the child, its drain threads and its ready signal.
pub(crate) type Watched = (
    std::process::Child,
    Vec<JoinHandle<()>>,
    std::sync::mpsc::Receiver<()>,
);

/// Spawns `cmd` with its stdin closed and both output pipes drained into `output` by one thread
/// each, and returns the child, the drain threads and a channel that gets one message each time
/// a line containing `ready` is printed. The channel closes once both pipes do, so a process
/// that dies before it is ready ends a wait on it instead of leaving it to the guard timeout.
pub(crate) fn spawn_watched(
    cmd: &mut std::process::Command,
    output: &Output,
    ready: &'static str,
) -> Result<Watched, crate::Error> {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| crate::Error::Spawn {
            bin: cmd.get_program().into(),
            source,
        })?;
    let (tx, rx) = std::sync::mpsc::channel();
    let pipes: [(Option<Box<dyn Read + Send>>, Stream); 2] = [
        (
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            Stream::Stdout,
        ),
        (
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            Stream::Stderr,
        ),
    ];
    let mut readers = Vec::new();
    for (pipe, stream) in pipes {
        let Some(pipe) = pipe else { continue };
        let tx = tx.clone();
        readers.push(drain(pipe, stream, output.clone(), move |line| {
            if line.contains(ready) {
                let _ = tx.send(());
            }
        }));
    }
    Ok((child, readers, rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_is_bounded_and_markers_count_every_line() {
        let out = Output::new(2, &["open".to_owned()]);
        out.push(Stream::Stdout, "a open".into());
        let mark = out.mark();
        out.push(Stream::Stderr, "b".into());
        out.push(Stream::Stdout, "c open".into());
        assert_eq!(out.tail(), "b\nc open");
        assert_eq!(out.count("open"), Some(2));
        assert_eq!(out.count("other"), None);
        assert_eq!(out.since(mark, Stream::Stderr), "b\n");
        assert_eq!(out.since(mark, Stream::Stdout), "c open\n");
    }
}
