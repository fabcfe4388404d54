//! Download progress, one file at a time: a bar per file on a terminal, a plain line every
//! quarter when the output is a file or a pipe, and log lines (start and end) inside the server.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// indicatif bars on stderr.
    Bars,
    /// Plain lines on stderr.
    Lines,
    /// `tracing` events.
    Log,
}

impl Display {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn for_stderr() -> Display {
        if std::io::stderr().is_terminal() { Display::Bars } else { Display::Lines }
    }
}

/// Progress of one file, fed by `hf-hub` (which may start over after a retry: `init` again, then
/// `update` with the bytes already on disk).
pub struct FileProgress {
    display: Display,
    label: String,
    size: u64,
    done: u64,
    /// Next quarter to print in [`Display::Lines`].
    next_quarter: u64,
    started: Option<Instant>,
    bar: Option<ProgressBar>,
}

impl FileProgress {
    pub fn new(display: Display, repo: &str, file: &str) -> FileProgress {
        FileProgress { display, label: format!("{repo}: {file}"), size: 0, done: 0, next_quarter: 1, started: None, bar: None }
    }

    fn line(&self, text: &str) {
        let _ = writeln!(std::io::stderr().lock(), "{}: {text}", self.label);
    }
}

impl hf_hub::api::Progress for FileProgress {
    fn init(&mut self, size: usize, _filename: &str) {
        self.size = size as u64;
        self.done = 0;
        if self.started.is_some() {
            return; // a resumed attempt: `update` brings the position back
        }
        self.started = Some(Instant::now());
        match self.display {
            Display::Bars => {
                let bar = ProgressBar::new(self.size).with_message(self.label.clone());
                let style = ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
                    .expect("a valid template")
                    .progress_chars("=> ");
                bar.set_style(style);
                self.bar = Some(bar);
            }
            Display::Lines => self.line(&format!("downloading {}", HumanBytes(self.size))),
            Display::Log => tracing::info!(file = %self.label, size = %HumanBytes(self.size), "downloading"),
        }
    }

    fn update(&mut self, n: usize) {
        self.done += n as u64;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
        }
        if self.display == Display::Lines && self.size > 0 {
            while self.next_quarter < 4 && self.done * 4 >= self.next_quarter * self.size {
                self.line(&format!("{}% of {}", self.next_quarter * 25, HumanBytes(self.size)));
                self.next_quarter += 1;
            }
        }
    }

    fn finish(&mut self) {
        if self.done < self.size {
            return; // interrupted; hf-hub retries or reports the error
        }
        let secs = self.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let rate = HumanBytes((self.size as f64 / secs.max(1e-3)) as u64);
        match self.display {
            Display::Bars => {
                if let Some(bar) = self.bar.take() {
                    bar.finish();
                }
            }
            Display::Lines => self.line(&format!("done, {} in {secs:.1} s ({rate}/s)", HumanBytes(self.size))),
            Display::Log => tracing::info!(file = %self.label, size = %HumanBytes(self.size), secs, "downloaded"),
        }
    }
}
