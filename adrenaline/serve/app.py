"""`serve run` entry point: ``adrenaline.serve.app:build_app`` with the YAML's args."""

from __future__ import annotations

from ray.serve import Application

from adrenaline.app_config import parse_app_args


def build_app(args: dict | None = None) -> Application:
    from adrenaline.serve.ingress import Ingress
    from adrenaline.serve.router import Router

    app_args = parse_app_args(args)
    router = Router.options(**app_args.serve_options).bind(app_args)
    return Ingress.options(**app_args.ingress_serve_options).bind(router, app_args)


def build_router_app(args: dict | None = None) -> Application:
    """The router alone (no HTTP): for handle clients and tests."""
    from adrenaline.serve.router import Router

    app_args = parse_app_args(args)
    return Router.options(**app_args.serve_options).bind(app_args)
