"""The ``silogate`` command: servers, development certificates, synthetic data, demo, queries.

Start-up problems (missing files, a port in use, an invalid policy) end with one line naming the
problem on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import SilogateError

if TYPE_CHECKING:
    from gateway.client import SilogateClient
    from gateway.policy.model import Bundle

EXIT_USAGE = 2


def _serve(args: argparse.Namespace) -> int:
    from gateway.logs import configure_logging
    from gateway.server.runtime import serve_until_signalled, write_port_file
    from gateway.settings import GatewayConfig, SiloConfig, load_config

    configure_logging()

    async def run() -> None:
        overrides: dict[str, object] = {}
        if args.listen:
            overrides["listen"] = args.listen
        if args.reflection:
            overrides["reflection"] = True
        if args.role == "gateway":
            from gateway.server.app import start_gateway

            gateway_config = load_config(args.config, GatewayConfig).model_copy(update=overrides)
            process = await start_gateway(gateway_config)
        else:
            from gateway.silo.app import start_silo

            silo_config = load_config(args.config, SiloConfig).model_copy(update=overrides)
            process = await start_silo(silo_config)  # type: ignore[assignment]
        write_port_file(args.port_file, process.port)
        await serve_until_signalled(process)

    asyncio.run(run())
    return 0


def _certs_init(args: argparse.Namespace) -> int:
    from gateway.crypto.dev_ca import init_dev_pki
    from gateway.demo.stack import DEMO_CONSUMERS, DEMO_SILOS

    pki = init_dev_pki(
        args.directory,
        silos=args.silo or DEMO_SILOS,
        consumers=args.consumer or DEMO_CONSUMERS,
        overwrite=args.overwrite,
    )
    sys.stdout.write(f"development CA and certificates written to {pki.directory}\n")
    return 0


def _silo_keygen(args: argparse.Namespace) -> int:
    from gateway.silo.receipt import generate_receipt_key

    key_id = generate_receipt_key(args.private, args.public, overwrite=args.overwrite)
    sys.stdout.write(
        f"receipt key {key_id}: private key {args.private} (the silo's receipt_key), public key "
        f"{args.public} (the gateway's silos.<name>.receipt_key; auditors' --silo-key)\n"
    )
    return 0


def _data_generate(args: argparse.Namespace) -> int:
    from gateway.demo.synthetic import generate_departments

    files = generate_departments(args.directory, args.people, args.seed, progress=True)
    for silo, path in files.items():
        sys.stdout.write(f"{silo}: {path}\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo.scenario import run_demo

    return run_demo(args.workdir, people=args.people, seed=args.seed)


def _up(args: argparse.Namespace) -> int:
    from gateway.demo.stack import run_up

    return run_up(args.directory, people=args.people, seed=args.seed, port=args.port)


def _client(args: argparse.Namespace) -> SilogateClient:
    from gateway.client import SilogateClient
    from gateway.settings import ClientConfig, load_config

    config = load_config(args.client, ClientConfig)
    return SilogateClient.connect(
        config.address,
        ca=config.tls.ca,
        cert=config.tls.cert,
        key=config.tls.key,
        timeout=args.timeout,
    )


def _query(args: argparse.Namespace) -> int:
    from gateway.client import count, count_persons
    from gateway.client.filters import parse_where
    from gateway.client.render import print_result

    spend = {"epsilon": args.epsilon, "rho": args.rho, "target_error": args.target_error}
    filters = [parse_where(text) for text in args.where]
    make = count if args.measure == "count" else count_persons
    measure = make(args.id or args.measure, args.dataset, *filters, **spend)
    with _client(args) as client:
        result = client.query(
            purpose=args.purpose,
            measures=[measure],
            group_by=args.group_by,
            request_id=args.request_id,
        )
    print_result(result, output=args.format)
    return 0


def _budget(args: argparse.Namespace) -> int:
    from gateway.client.render import print_budget

    with _client(args) as client:
        print_budget(client.budget(), output=args.format)
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from gateway.client.render import print_datasets

    with _client(args) as client:
        print_datasets(client.datasets(), output=args.format)
    return 0


def _load_for_tools(directory: Path) -> Bundle | None:
    """The bundle, or None after printing every problem (``file:line:col: message``)."""
    from gateway.errors import PolicyInvalid
    from gateway.policy.loader import load_bundle

    try:
        return load_bundle(directory)
    except PolicyInvalid as err:
        for problem in err.problems:
            sys.stdout.write(f"{problem}\n")
        sys.stdout.write(f"{len(err.problems)} problem(s)\n")
        return None


def _policy_check(args: argparse.Namespace) -> int:
    from gateway.policy.lint import lint_bundle

    bundle = _load_for_tools(args.directory)
    if bundle is None:
        return 1
    warnings = lint_bundle(args.directory, bundle)
    for warning in warnings:
        sys.stdout.write(f"{warning}\n")
    sys.stdout.write(
        f"ok: {len(bundle.datasets)} datasets, {len(bundle.consumers)} consumers, "
        f"{len(bundle.rules)} rules; policy version {bundle.version}\n"
    )
    if warnings:
        sys.stdout.write(f"{len(warnings)} warning(s)\n")
    return 0


def _policy_test(args: argparse.Namespace) -> int:
    from gateway.policy.policytests import TESTS_DIR, report, run_policy_tests

    bundle = _load_for_tools(args.directory)
    if bundle is None:
        return 1
    run = run_policy_tests(args.directory, bundle)
    if not run.results and not run.problems:
        sys.stdout.write(f"no policy tests found: {args.directory / TESTS_DIR}/*.yaml\n")
        return 1
    report(run, sys.stdout.write)
    return 0 if run.ok else 1


def _policy_explain(args: argparse.Namespace) -> int:
    from gateway.policy.cases import build_query, evaluate, load_query_file
    from gateway.policy.explain import render_explanation

    bundle = _load_for_tools(args.directory)
    if bundle is None:
        return 1
    spec, problems = load_query_file(args.query, str(args.query))
    if spec is None:
        for problem in problems:
            sys.stdout.write(f"{problem}\n")
        return 1
    consumer = args.consumer or spec.consumer
    if consumer is None:
        sys.stderr.write("silogate: name the consumer with --consumer or in the query file\n")
        return EXIT_USAGE
    if spec.consumer is not None and args.consumer and spec.consumer != args.consumer:
        sys.stderr.write(
            f"silogate: the query file is for consumer '{spec.consumer}' "
            f"but --consumer is '{args.consumer}'\n"
        )
        return EXIT_USAGE
    outcome = evaluate(bundle, consumer, build_query(spec, bundle))
    render_explanation(bundle, consumer, outcome, sys.stdout.write)
    return 0


def _policy_diff(args: argparse.Namespace) -> int:
    from gateway.policy.diff import report_diff

    old = _load_for_tools(args.old)
    new = _load_for_tools(args.new)
    if old is None or new is None:
        return 1
    report_diff(old, new, sys.stdout.write)
    return 0


def _policy_schema(args: argparse.Namespace) -> int:
    import json

    from gateway.policy.schema import bundle_schema, tests_schema

    schema = tests_schema() if args.tests else bundle_schema()
    sys.stdout.write(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    return 0


def _policy_keygen(args: argparse.Namespace) -> int:
    from gateway.policy.signing import generate_signing_key

    key_id = generate_signing_key(args.private, args.public, overwrite=args.overwrite)
    sys.stdout.write(
        f"signing key {key_id}: private key {args.private} (keep it with the policy authors), "
        f"public key {args.public} (configure it as policy_verify_key)\n"
    )
    return 0


def _policy_sign(args: argparse.Namespace) -> int:
    from gateway.errors import PolicyInvalid
    from gateway.policy.signing import sign_bundle

    try:
        signature = sign_bundle(args.directory, args.key)
    except PolicyInvalid as err:
        # An invalid bundle is never signed; show why as `policy check` would.
        for problem in err.problems:
            sys.stdout.write(f"{problem}\n")
        sys.stdout.write(f"{len(err.problems)} problem(s); the bundle was not signed\n")
        return 1
    sys.stdout.write(f"signed: {signature}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="silogate",
        description="Privacy-preserving data-sharing gateway: noisy aggregates across silos.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway or a silo agent")
    serve.add_argument("role", choices=["gateway", "silo"])
    serve.add_argument("--config", type=Path, required=True, help="YAML config file")
    serve.add_argument("--listen", help="override the listen address (host:port, port 0 = any)")
    serve.add_argument("--port-file", type=Path, help="write the bound port to this file")
    serve.add_argument(
        "--reflection", action="store_true", help="enable gRPC reflection (development only)"
    )
    serve.set_defaults(handler=_serve)

    certs = commands.add_parser("certs", help="development certificates")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True)
    certs_init = certs_commands.add_parser("init", help="create a development CA and certificates")
    certs_init.add_argument("directory", type=Path)
    certs_init.add_argument("--silo", action="append", default=None)
    certs_init.add_argument("--consumer", action="append", default=None)
    certs_init.add_argument("--overwrite", action="store_true")
    certs_init.set_defaults(handler=_certs_init)

    silo = commands.add_parser("silo", help="silo agent tools")
    silo_commands = silo.add_subparsers(dest="silo_command", required=True)
    silo_keygen = silo_commands.add_parser(
        "keygen", help="create the Ed25519 key pair with which a silo signs its release receipts"
    )
    silo_keygen.add_argument("private", type=Path, help="private key file (written mode 0600)")
    silo_keygen.add_argument("public", type=Path, help="public key file, for the gateway")
    silo_keygen.add_argument("--overwrite", action="store_true", help="replace existing files")
    silo_keygen.set_defaults(handler=_silo_keygen)

    data = commands.add_parser("data", help="synthetic department data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    generate = data_commands.add_parser("generate", help="write one DuckDB file per silo")
    generate.add_argument("directory", type=Path)
    generate.add_argument("--people", type=int, default=200_000)
    generate.add_argument("--seed", type=int, default=2026)
    generate.set_defaults(handler=_data_generate)

    demo = commands.add_parser("demo", help="run the whole system and a short scenario, then stop")
    demo.add_argument("--workdir", type=Path, default=Path("work/demo"))
    demo.add_argument("--people", type=int, default=200_000)
    demo.add_argument("--seed", type=int, default=2026)
    demo.set_defaults(handler=_demo)

    up = commands.add_parser("up", help="start gateway and silos in the foreground until Ctrl-C")
    up.add_argument("directory", type=Path)
    up.add_argument("--people", type=int, default=200_000)
    up.add_argument("--seed", type=int, default=2026)
    up.add_argument("--port", type=int, default=50051, help="gateway port")
    up.set_defaults(handler=_up)

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--client", type=Path, required=True, help="client YAML (address, tls)")
        p.add_argument("--format", choices=["table", "json"], default="table")
        p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")

    query = commands.add_parser("query", help="send one query and print the noisy answer")
    client_options(query)
    query.add_argument("--purpose", required=True)
    query.add_argument("--dataset", required=True, help="e.g. civil.residents")
    query.add_argument("--measure", choices=["count", "count_persons"], default="count")
    query.add_argument("--id", help="name of the result column (default: the measure)")
    query.add_argument("--group-by", action="append", default=[], help="repeat for several")
    query.add_argument(
        "--where", action="append", default=[], help="filter, e.g. 'birth_year<=1966'"
    )
    spend = query.add_mutually_exclusive_group(required=True)
    spend.add_argument("--epsilon")
    spend.add_argument("--rho")
    spend.add_argument("--target-error")
    query.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    query.set_defaults(handler=_query)

    budget = commands.add_parser("budget", help="show the caller's budgets")
    client_options(budget)
    budget.set_defaults(handler=_budget)

    datasets = commands.add_parser("datasets", help="list the datasets the caller may query")
    client_options(datasets)
    datasets.set_defaults(handler=_datasets)

    policy = commands.add_parser("policy", help="policy bundle tools")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_commands.add_parser("check", help="validate a bundle; warn about risky settings")
    check.add_argument("directory", type=Path)
    check.set_defaults(handler=_policy_check)

    policy_test = policy_commands.add_parser("test", help="run the policy tests in DIR/tests")
    policy_test.add_argument("directory", type=Path)
    policy_test.set_defaults(handler=_policy_test)

    explain = policy_commands.add_parser(
        "explain", help="why a query is allowed or denied, and its cost (spends nothing)"
    )
    explain.add_argument("directory", type=Path)
    explain.add_argument("--consumer", help="the consumer (default: the query file's)")
    explain.add_argument(
        "--query", type=Path, required=True, help="YAML query, in the form of a test case"
    )
    explain.set_defaults(handler=_policy_explain)

    policy_diff = policy_commands.add_parser(
        "diff", help="what became allowed or denied between two bundles, and budget changes"
    )
    policy_diff.add_argument("old", type=Path)
    policy_diff.add_argument("new", type=Path)
    policy_diff.set_defaults(handler=_policy_diff)

    schema = policy_commands.add_parser("schema", help="print the JSON Schema of bundle files")
    schema.add_argument(
        "--tests", action="store_true", help="the schema of policy test files instead"
    )
    schema.set_defaults(handler=_policy_schema)

    keygen = policy_commands.add_parser("keygen", help="create an Ed25519 bundle signing key")
    keygen.add_argument("private", type=Path, help="private key file (written mode 0600)")
    keygen.add_argument("public", type=Path, help="public key file, for policy_verify_key")
    keygen.add_argument("--overwrite", action="store_true", help="replace existing key files")
    keygen.set_defaults(handler=_policy_keygen)

    sign = policy_commands.add_parser("sign", help="validate and sign a bundle")
    sign.add_argument("directory", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="private signing key")
    sign.set_defaults(handler=_policy_sign)

    from gateway.audit.cli import register_audit_commands

    register_audit_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except SilogateError as err:
        sys.stderr.write(f"silogate: {err.reason}: {err.message}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        from gateway.client import ClientError

        if isinstance(err, ClientError):
            sys.stderr.write(f"silogate: {err.reason}: {err.message}\n")
            for violation in err.violations[1:]:
                sys.stderr.write(f"  {violation.field}: {violation.description}\n")
            return 1
        if isinstance(err, (FileExistsError, ValueError)):
            sys.stderr.write(f"silogate: {err}\n")
            return EXIT_USAGE
        raise
    return code


if __name__ == "__main__":
    sys.exit(main())
