"""HTTP downloads that survive faults: timeouts, bounded retries with backoff, resumption with Range."""

from __future__ import annotations

import http.client
import logging
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

log = logging.getLogger(__name__)

# Small reads written at once: a transfer that stalls or breaks keeps every byte that arrived.
READ_BYTES = 64 * 1024
# Client errors that are about timing, not about the request itself: worth another attempt.
TRANSIENT_CLIENT_STATUS = frozenset({408, 429})


@dataclass(frozen=True)
class DownloadSettings:
    """How downloads wait and retry (studies.<study>.data.download in params.yaml)."""

    timeout_s: float  # connecting, and each read: this long without a byte fails the attempt
    retries: int  # further attempts after a transient failure (5xx, 408, 429, timeout, reset)
    backoff_s: float  # wait before the first retry, doubled before each further one


class DownloadError(OSError):
    """A download failed; the message names the URL and says what to do."""

    def __init__(self, message: str, url: str, status: int | None = None, transient: bool = False):
        super().__init__(message)
        self.url = url
        self.status = status
        self.transient = transient


class HTTPStatusError(DownloadError):
    """The server answered with an HTTP error status."""


class IncompleteDownloadError(DownloadError):
    """The server closed the connection before sending the whole file."""


def _progress(total: int | None, initial: int, desc: str) -> tqdm:
    """Return a byte progress bar, silent when stderr is not a terminal."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not sys.stderr.isatty(),
    )


def _size(path: Path) -> int:
    """Return the size of `path`, 0 if it does not exist."""
    return path.stat().st_size if path.exists() else 0


def _as_download_error(error: Exception, url: str, timeout_s: float) -> DownloadError:
    """Describe a failed request or read as a DownloadError, transient or not."""
    if isinstance(error, DownloadError):
        return error
    if isinstance(error, urllib.error.HTTPError):
        transient = error.code >= 500 or error.code in TRANSIENT_CLIENT_STATUS
        return HTTPStatusError(
            f"{url} answered HTTP {error.code} {error.reason}", url, error.code, transient
        )
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, TimeoutError):
        return DownloadError(f"no data from {url} for {timeout_s:g} s", url, transient=True)
    # Resets, refusals and a connection closed before the status line (RemoteDisconnected is a
    # ConnectionResetError) are usually a server or network hiccup; so is a broken chunked stream.
    if isinstance(reason, (ConnectionError, http.client.HTTPException)):
        return DownloadError(
            f"connection to {url} failed: {type(reason).__name__}: {reason}", url, transient=True
        )
    return DownloadError(f"cannot download {url}: {reason}", url)


@dataclass
class _Progress:
    """What one download has learnt so far across its attempts."""

    total: int | None  # the full size, from the caller or the server's Content-Length


def _attempt(url: str, part: Path, timeout_s: float, progress: _Progress) -> bool:
    """Append the rest of `url` to `part` (all of it if the server ignores Range); False if there is no rest."""
    offset = _size(part)
    headers = {"User-Agent": "detr-sparsity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        # 416: nothing lies past the bytes already kept; the caller's checks judge them.
        if error.code == 416 and offset:
            log.info("%s has no bytes past the %s kept in %s", url, f"{offset:,}", part)
            return False
        raise
    with response:
        # A file:// URL has no status; like a 200, it is the whole file.
        if offset and response.status != 206:
            log.info("%s ignored the range request; downloading it from the start", url)
            offset = 0
        elif offset:
            content_range = response.headers.get("Content-Range", "")
            match = re.match(r"bytes (\d+)-", content_range)
            if not match or int(match[1]) != offset:
                part.unlink()
                raise DownloadError(
                    f"{url} answered range {offset}- with {content_range!r}; discarded {part}",
                    url,
                    transient=True,
                )
        length = response.headers.get("Content-Length")
        if length is not None:
            progress.total = offset + int(length)
        # read1 returns what has arrived instead of waiting to fill the buffer.
        read = getattr(response, "read1", response.read)
        with open(part, "ab" if offset else "wb") as f, _progress(progress.total, offset, part.name) as bar:
            while chunk := read(READ_BYTES):
                f.write(chunk)
                bar.update(len(chunk))
    received = _size(part)
    # http.client returns an empty read when the connection closes early instead of raising.
    if progress.total is not None and received < progress.total:
        raise IncompleteDownloadError(
            f"{url} closed the connection after {received:,} of {progress.total:,} bytes",
            url,
            transient=True,
        )
    return True


def download_part(
    url: str,
    part: Path,
    settings: DownloadSettings,
    *,
    size: int | None = None,
    incomplete: Callable[[Path], str | None] | None = None,
) -> int | None:
    """Bring `part` up to the whole of `url`, resuming and retrying transient failures; return its size if known.

    `size` is the expected size where the caller knows it. Where neither it nor the server gives one,
    `incomplete(part)` says why the bytes are not yet a whole file (None when they are): the rest is
    then asked for, and a server with nothing more answers 416, which ends the download as it is.
    """
    attempts = settings.retries + 1
    progress = _Progress(size)
    for attempt in range(1, attempts + 1):
        try:
            more = _attempt(url, part, settings.timeout_s, progress)
            if more and progress.total is None and incomplete is not None and (why := incomplete(part)):
                raise IncompleteDownloadError(
                    f"{url} sent {_size(part):,} bytes: the file {why}", url, transient=True
                )
            return progress.total
        except (OSError, http.client.HTTPException) as raw:
            error = _as_download_error(raw, url, settings.timeout_s)
            if not error.transient:
                raise _final(error, "not retried", part, progress.total) from raw
            if attempt == attempts:
                tried = f"gave up after {attempts} attempt{'s' if attempts > 1 else ''}"
                raise _final(error, tried, part, progress.total) from raw
            wait = settings.backoff_s * 2 ** (attempt - 1)
            log.warning("%s (attempt %d of %d); retrying in %g s", error, attempt, attempts, wait)
            time.sleep(wait)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _final(error: DownloadError, what: str, part: Path, total: int | None) -> DownloadError:
    """Return `error` restated with what was tried and what to do next."""
    kept = _size(part)
    if not kept:
        part.unlink(missing_ok=True)  # an empty .part helps no one
    if error.status is not None and not error.transient:
        advice = "check base_url and that the server holds this file"
    else:
        of = f" of {total:,}" if total is not None else ""
        advice = f"rerun to resume: {kept:,}{of} bytes kept in {part}" if kept else "rerun to try again"
        if not error.transient:
            advice = f"check base_url and the network, then {advice}"
    return type(error)(f"{error}; {what}; {advice}", error.url, error.status, error.transient)
