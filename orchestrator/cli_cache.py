"""`kiln cache ls|verify|prune|explain|export|import|keygen|pull`: look after the on-disk compilation cache.

Imports only click and cache/ (no torch, no ray), so these commands start instantly; `pull`
imports ray in its body, as it talks to a cluster. The work is
done in cache/maintenance.py; this module parses options and formats results.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import click

from kiln.cache import maintenance
from kiln.cache.errors import CacheError

ROOT_HELP = "Cache root directory (default: $KILN_CACHE_ROOT, else ~/.cache/kiln)."


class CacheCommandError(click.ClickException):
    """A cache command could not run (missing or unsafe root, unknown key): exit status 2."""

    exit_code = 2


@contextlib.contextmanager
def _cache_errors() -> Iterator[None]:
    """Turn CacheError (UnsafeCacheError included) and OS errors (permission denied, say)
    into a clean message and exit status 2."""
    try:
        yield
    except (CacheError, OSError) as e:
        raise CacheCommandError(str(e)) from None


@contextlib.contextmanager
def _quiet_cache_log() -> Iterator[None]:
    """Hold back kiln.cache warnings: verify reports each problem itself, once."""
    cache_logger = logging.getLogger("kiln.cache")
    level = cache_logger.level
    cache_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cache_logger.setLevel(level)


def root_option(command: Any) -> Any:
    return click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None, help=ROOT_HELP)(command)


@click.group("cache")
def cache_group() -> None:
    """Inspect, verify and prune the on-disk compilation cache."""


@cache_group.command("ls")
@root_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
def ls_command(root: Path | None, as_json: bool) -> None:
    """List cache entries: size, blobs, ranks, created and last-used dates (UTC)."""
    with _cache_errors():
        entries = maintenance.list_entries(root)
    total = sum(e.size for e in entries)
    if as_json:
        doc = {"entries": [e.as_dict() for e in entries], "total": {"entries": len(entries), "size": total}}
        click.echo(json.dumps(doc, indent=2))
        return
    header = ("KEY", "SIZE", "BLOBS", "RANKS", "CREATED", "LAST USED")
    rows = [
        (
            e.key,
            maintenance.format_size(e.size),
            str(e.blobs),
            format_ranks(e.ranks),
            maintenance.iso_utc(e.created) or "-",
            maintenance.iso_utc(e.last_used) or "-",
        )
        for e in entries
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    click.echo(f"total: {len(entries)} entries, {maintenance.format_size(total)}")


@cache_group.command("verify")
@root_option
@click.pass_context
def verify_command(ctx: click.Context, root: Path | None) -> None:
    """Re-hash every blob, check refs, rank indexes and key factors; quarantine what is bad.

    Exits 1 if anything was quarantined or needs attention, else 0.
    """
    with _cache_errors(), _quiet_cache_log():
        report = maintenance.verify(root)
    for path, reason in report.quarantined:
        click.echo(f"quarantined {path}: {reason}")
    for problem in report.problems:
        click.echo(f"problem: {problem}")
    for path in report.temp_removed:
        click.echo(f"removed stale temporary file {path}")
    click.echo(
        f"verified {report.entries} entries: {report.blobs} blobs ({maintenance.format_size(report.bytes_checked)}), "
        f"{report.refs} refs, {report.indexes} rank indexes; "
        f"{len(report.quarantined)} quarantined, {len(report.problems)} problems"
    )
    if not report.ok:
        ctx.exit(1)


def _parse_size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return maintenance.parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


@cache_group.command("prune")
@root_option
@click.option("--older-than", type=click.FloatRange(min=0), metavar="DAYS", help="Remove entries last used more than DAYS ago.")
@click.option(
    "--max-size", callback=_parse_size_option, metavar="SIZE",
    help="Then remove least-recently-used entries until the cache is at most SIZE (e.g. 500M, 2G, or bytes).",
)
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
def prune_command(root: Path | None, older_than: float | None, max_size: int | None, dry_run: bool) -> None:
    """Delete whole cache entries by age and/or to fit a size."""
    if older_than is None and max_size is None:
        raise click.UsageError("give --older-than DAYS and/or --max-size SIZE")
    with _cache_errors():
        report = maintenance.prune(root, older_than_days=older_than, max_size=max_size, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for info, reason in report.removed:
        click.echo(f"{verb} {info.key}  {maintenance.format_size(info.size)}  ({reason})")
    click.echo(
        f"{verb} {len(report.removed)} entries ({maintenance.format_size(report.removed_bytes)}); "
        f"{len(report.kept)} entries remain ({maintenance.format_size(report.kept_bytes)})"
    )


@cache_group.command("explain")
@root_option
@click.argument("key")
@click.argument("other_key", required=False)
def explain_command(root: Path | None, key: str, other_key: str | None) -> None:
    """Show the factors of KEY, or only those that differ between KEY and OTHER_KEY.

    A unique prefix of a key will do.
    """
    with _cache_errors():
        key, factors, verified = maintenance.load_factors(root, key)
        if other_key is not None:
            other_key, other, other_verified = maintenance.load_factors(root, other_key)
    for name, ok in [(key, verified)] + ([(other_key, other_verified)] if other_key is not None else []):
        if not ok:
            click.echo(f"warning: key_factors.json of {name} does not hash to its key; `kiln cache verify` sets it aside", err=True)
    if other_key is None:
        click.echo(json.dumps(factors, indent=2, sort_keys=True))
        return
    differences = maintenance.diff_factors(factors, other)
    if not differences:
        click.echo("identical factors")
    for path, a, b in differences:
        click.echo(f"{path}: {_show(a)} != {_show(b)}")


@cache_group.command("export")
@root_option
@click.argument("keys", nargs=-1)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The bundle file to write (a tar).")
@click.option("--sign", "signing_key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Sign the manifest with this Ed25519 private key (PEM; see `kiln cache keygen`).")
def export_command(root: Path | None, keys: tuple[str, ...], output: Path, signing_key: Path | None) -> None:
    """Write cache entries KEY... (unique prefixes will do; none: all) to a portable bundle.

    The bundle holds each entry's blobs, refs, rank indexes and key factors, and a manifest
    with every file's digest; `kiln cache import` verifies them all before storing any.
    """
    from kiln.cache.bundle import export_bundle

    with _cache_errors():
        report = export_bundle(root, list(keys), output, signing_key=signing_key)
    signed = f", signed by {report.signer}" if report.signer else ""
    click.echo(f"exported {len(report.entries)} entries ({report.files} files, "
               f"{maintenance.format_size(report.bytes)}) to {report.path}{signed}")


@cache_group.command("import")
@root_option
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--require-signature", "public_key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Refuse the bundle unless this Ed25519 public key (PEM) signed its manifest.")
def import_command(root: Path | None, bundle: Path, public_key: Path | None) -> None:
    """Verify BUNDLE whole (every digest, the schema, safe member paths, the signature if asked),
    then add its entries to the cache; an entry already present gets only what it lacks.

    Exits 2 with nothing written if the bundle is refused.
    """
    from kiln.cache.bundle_import import import_bundle

    with _cache_errors():
        report = import_bundle(bundle, root, require_signature=public_key)
    for key in report.added:
        click.echo(f"added {key}")
    for key, files in report.merged.items():
        click.echo(f"merged {key}: {files} files it lacked")
    for key in report.skipped:
        click.echo(f"skipped {key}: already present with everything the bundle holds")
    click.echo(f"imported {report.bundle} (signature: {report.signature}): {len(report.added)} added, "
               f"{len(report.merged)} merged, {len(report.skipped)} skipped; {report.files} files, "
               f"{maintenance.format_size(report.bytes)} verified")


@cache_group.command("keygen")
@click.argument("private_key", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("public_key", type=click.Path(dir_okay=False, path_type=Path))
def keygen_command(private_key: Path, public_key: Path) -> None:
    """Make an Ed25519 key pair for signing bundles: PRIVATE_KEY (PEM, mode 600) for
    `export --sign`, PUBLIC_KEY (PEM) for `import --require-signature`. Never overwrites."""
    from kiln.cache.signing import generate_keypair

    with _cache_errors():
        fp = generate_keypair(private_key, public_key)
    click.echo(f"wrote {private_key} (private, keep it secret) and {public_key} (public); fingerprint {fp}")


@cache_group.command("pull")
@root_option
@click.argument("keys", nargs=-1)
@click.option("--address", required=True, help="The Ray cluster ('auto' or host:port) whose registry to read.")
def pull_command(root: Path | None, keys: tuple[str, ...], address: str) -> None:
    """Fill this node's cache from the cluster: fetch every graph that the cluster's artifact
    registry lists (of cache keys starting with KEY..., if given), verify it, store it.

    The artifacts come from the workers that published them, so their warm-up or serving
    processes must still run. Exits 1 if any graph could not be fetched.
    """
    from kiln.orchestrator.pull import pull

    with _cache_errors():
        report = pull(address, root, list(keys))
    for failure in report.failed:
        click.echo(f"failed {failure}")
    sources = ", ".join(f"{n} from {node}" for node, n in sorted(report.sources.items())) or "none"
    click.echo(f"pulled {report.stored} graphs ({maintenance.format_size(report.bytes)} in {report.seconds:.2f} s; "
               f"{sources}) of {len(report.keys)} cache keys into {report.root}; {report.present} already present, "
               f"{len(report.failed)} failed")
    if report.failed:
        raise SystemExit(1)


def format_ranks(ranks: list[int]) -> str:
    """Ranks as compact ranges: [0, 1, 2, 3, 5] -> "0-3,5"; [] -> "-"."""
    if not ranks:
        return "-"
    spans: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(spans)


def _show(value: Any) -> str:
    return repr(value) if value is maintenance.MISSING else json.dumps(value, sort_keys=True)
