"""``kedro review``: start the review station on a trained model and print its address.

Nothing heavy is imported until the command runs (``kedro --help`` stays fast)."""

from __future__ import annotations

import ipaddress
import secrets
import socket
from pathlib import Path

import click

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@click.command(name="review")
@click.option("--method", default=None, help="review the latest trained model of this method (pipeline name: patchcore, dinomaly, ...)")
@click.option("--version", "version", default=None, help="with --method: this checkpoint version (a folder name under data/06_models/<method>/<stage>.safetensors/)")
@click.option("--model", default=None, help="instead of --method: an MLflow model (models:/uad-<method>/<v>, runs:/<id>/model) or its downloaded folder")
@click.option("--env", "-e", default=None, help="Kedro environment whose catalog and infer.* settings are used (default: the project's)")
@click.option("--class-name", default=None, help="class of the reviewed images (one-class checkpoints: which model; default: the model's only class)")
@click.option("--reviewed", default=None, help="the folder marks are written to, MVTec layout (default: data/01_raw/reviewed_<method>)")
@click.option("--host", default=LOOPBACK, show_default=True, help="address to listen on; anything but loopback needs --token (or one is generated)")
@click.option("--port", default=8765, show_default=True, type=int, help="port (0: any free port)")
@click.option("--token", default=None, envvar="UAD_REVIEW_TOKEN", help="access token (required off loopback; env UAD_REVIEW_TOKEN)")
@click.option("--allow", multiple=True, help="another folder (outside the project) whose images may be named on the page; repeatable")
@click.option("--max-upload-mb", default=64.0, show_default=True, type=float, help="largest upload accepted")
@click.option("--max-pixels", default=40_000_000, show_default=True, type=int, help="largest image accepted (width x height)")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
def review(method, version, model, env, class_name, reviewed, host, port, token, allow, max_upload_mb, max_pixels, device):
    """Score, look, set the threshold, correct the labels, retrain: a local web page."""
    import logging

    from uad.errors import UadError

    from .app import Server, Settings, Station
    from .model import open_model

    project = Path.cwd()
    loopback = is_loopback(host)
    if not loopback and not token:
        token = secrets.token_urlsafe(24)
        click.echo("Listening beyond loopback: a token was generated (give --token or UAD_REVIEW_TOKEN to choose it).")
    try:
        if version and not method:
            raise UadError("--version needs --method (a version of which method's checkpoints?)")
        click.echo("Loading the model ...")
        rm = open_model(project, method=method, version=version, model=model, env=env, class_name=class_name,
                        device=device)
        folder = Path(reviewed) if reviewed else project / "data" / "01_raw" / f"reviewed_{rm.namespace}"
        settings = Settings(project, env, folder if folder.is_absolute() else project / folder, list(allow), token,
                            max_upload_mb, max_pixels, loopback=loopback, class_name=class_name)
        server = Server(Station(rm, settings), host, port).start()
    except UadError as e:
        click.secho(f"Error: {e}", fg="red", err=True)
        raise SystemExit(1) from None
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = socket.gethostname()
    url = f"http://{shown}:{server.port}/" + (f"?token={token}" if token else "")
    click.echo(f"Review station for {rm.description}")
    click.echo(f"  open {url}")
    click.echo(f"  marks go to {settings.reviewed}; Ctrl+C stops the server")
    try:
        server.thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
