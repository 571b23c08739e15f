"""The Helm chart (``helm/pdg``), offline: rendered and linted by the real Helm
engine (helm-python-sdk), every manifest validated against the Kubernetes
schemas (kubernetes-validate, strict; the Prometheus operator's kinds by
hand), and what the chart promises asserted on the result: locked-down pods
without service links, one writer apart from the gateways, migrations as a
hook, checksums that roll the pods, bad values refused. pdg's own settings
loader reads the files and variables the chart gives each pod, and the
dashboard's and alerts' PromQL names only metrics a live gateway exports."""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from config.settings import ENVIRONMENT, Settings, load_settings
from ledger.note import signer_from_file
from licensing.keys import open_private_pem
from licensing.personal import read_key
from tests.conftest import World

CHART = Path(__file__).parents[1] / "helm" / "pdg"
RELEASE, NAMESPACE = "pdg", "data"
#: A recent Kubernetes release kubernetes-validate ships schemas for.
KUBE_VERSION = "1.34.0"
#: Kinds of the Prometheus operator, whose schemas are not Kubernetes'.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}

WorldFactory = Callable[..., Awaitable[World]]
Manifest = dict[str, Any]


def _pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


#: What an operator must give: the storage URLs and the three ledger keys.
SECRETS = {
    "databaseUrl": "postgresql+asyncpg://pdg:db-password@postgres:5432/pdg",
    "redisUrl": "redis://:redis-password@redis:6379/0",
    "ledgerSigningKey": _pem(ec.generate_private_key(ec.SECP256R1())),
    "ledgerLogKey": _pem(ed25519.Ed25519PrivateKey.generate()),
    "personalDigestKey": "5f" * 32,
}
HOST = "api.data.example.cn"
EVERYTHING: dict[str, Any] = {
    "secret": {**SECRETS, "metricsToken": "m-token", "keyPassphrase": "k-passphrase"},
    "signingKeys": {"passphrase": {"enabled": True}},
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "hosts": [{"host": HOST, "paths": [{"path": "/", "pathType": "Prefix"}]}],
        "tls": [{"secretName": "pdg-tls", "hosts": [HOST]}],
    },
    "gateway": {
        "workers": 2,
        "trustedProxies": ["10.0.0.0/8"],
        "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12},
        "podDisruptionBudget": {"enabled": True, "minAvailable": "50%"},
        "operationsPort": {"enabled": True, "port": 9090},
        # An upstream asking for mutual TLS: its client certificate mounted.
        "extraVolumes": [{"name": "upstream-tls", "secret": {"secretName": "city-bus-mtls"}}],
        "extraVolumeMounts": [{"name": "upstream-tls", "mountPath": "/etc/pdg/upstream", "readOnly": True}],
    },
    "metrics": {
        "token": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
    },
    "auditVerify": {"enabled": True},
    "config": {
        "ledger": {"max_backlog": 200000},
        "billing": {"time_zone": "UTC"},
        "proxy": {
            "client_certificates": {
                "city-bus": {
                    "cert_file": "/etc/pdg/upstream/tls.crt",
                    "key_file": "/etc/pdg/upstream/tls.key",
                }
            }
        },
    },
}
#: A Secret of the operator's own, its keys named its own way.
OWN_KEYS = {
    "databaseUrl": "db",
    "redisUrl": "redis",
    "ledgerSigningKey": "ledger.pem",
    "ledgerLogKey": "log.pem",
    "personalDigestKey": "personal",
    "metricsToken": "scrape-token",
    "keyPassphrase": "passphrase",
}
EXISTING_SECRET: dict[str, Any] = {
    "secret": {"existingSecret": "pdg-prod", "keys": OWN_KEYS},
    "gateway": {"operationsPort": {"enabled": False}, "adminPort": {"enabled": False}},
    "metrics": {"token": {"enabled": True}, "serviceMonitor": {"enabled": True}},
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {"secret": SECRETS},
    "everything": EVERYTHING,
    "existing-secret": EXISTING_SECRET,
    "replicas-without-hpa": {
        "secret": SECRETS,
        "gateway": {"replicas": 3, "autoscaling": {"enabled": False}},
    },
}


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> list[Manifest]:
    """Every manifest of the chart (hooks included), as ``helm install`` would
    render them."""
    files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[Manifest] = []
    for path, text in sorted(files.items()):
        if path.endswith(".yaml"):
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


@functools.cache
def rendered(name: str) -> tuple[Manifest, ...]:
    with helm.Chart.load(CHART) as loaded:
        return tuple(render(loaded, SCENARIOS[name]))


def one(docs: tuple[Manifest, ...] | list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def kinds(docs: tuple[Manifest, ...] | list[Manifest]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def pod_spec(doc: Manifest) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return doc["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def workloads(docs: tuple[Manifest, ...] | list[Manifest]) -> list[Manifest]:
    return [d for d in docs if d["kind"] in ("Deployment", "Job", "CronJob", "StatefulSet", "DaemonSet")]


def containers(doc: Manifest) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


# == the engine's verdicts ============================================================


def test_helm_lint_finds_nothing_to_warn_about() -> None:
    for values in (SCENARIOS["defaults"], EVERYTHING, EXISTING_SECRET):
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
        assert report["errors"] == [], report
        # Severity 1 is information ("icon is recommended"); 2 and 3 are
        # warnings and errors.
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_manifest_is_valid_for_kubernetes(scenario: str) -> None:
    docs = rendered(scenario)
    for doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            continue  # checked by hand below
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{scenario}: {where}: {exc}")
        assert doc["metadata"].get("namespace") == NAMESPACE, where
    # The validator is strict: a misspelt field is refused.
    typo = copy.deepcopy(one(docs, "Deployment", RELEASE))
    pod_spec(typo)["enableServiceLink"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBE_VERSION, strict=True)


def test_what_each_scenario_deploys() -> None:
    base = ["ConfigMap", "Deployment", "Deployment", "Job", "Secret", "Secret", "Service", "ServiceAccount"]
    assert kinds(rendered("defaults")) == base
    assert kinds(rendered("replicas-without-hpa")) == base
    assert kinds(rendered("everything")) == sorted(
        [
            *base,
            "ConfigMap",  # the dashboard
            "CronJob",
            "HorizontalPodAutoscaler",
            "Ingress",
            "PodDisruptionBudget",
            "PrometheusRule",
            "ServiceMonitor",
        ]
    )
    # A Secret of one's own: the chart makes none, not even for the hook.
    assert kinds(rendered("existing-secret")) == sorted(
        ["ConfigMap", "Deployment", "Deployment", "Job", "Service", "ServiceAccount", "ServiceMonitor"]
    )


# == the pods ============================================================================


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_pod_is_locked_down_and_gets_no_service_links(scenario: str) -> None:
    docs = workloads(rendered(scenario))
    assert docs
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        spec = pod_spec(doc)
        # Service links would inject PDG_PORT=tcp://... for a Service named pdg.
        assert spec["enableServiceLinks"] is False, where
        assert spec["automountServiceAccountToken"] is False, where
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["runAsUser"] == 10001, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in containers(doc):
            ctx = container["securityContext"]
            assert ctx["runAsNonRoot"] is True, where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["capabilities"] == {"drop": ["ALL"]}, where
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
            # The root filesystem is read-only: the data folder and /tmp
            # are emptyDirs.
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            data_dir = env_of(container)["PDG_DATA_DIR"]
            for path in (data_dir, "/tmp"):  # noqa: S108 - the pod's own /tmp, an emptyDir
                assert "emptyDir" in volumes[mounts[path]], (where, path)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_pdg_variable_the_chart_sets_is_a_setting(scenario: str) -> None:
    known = {*ENVIRONMENT, *(f"{name}_FILE" for name in ENVIRONMENT), "PDG_CONFIG"}
    seen: set[str] = set()
    for doc in workloads(rendered(scenario)):
        for container in containers(doc):
            assert "envFrom" not in container  # every name is visible here
            names = [e["name"] for e in container.get("env", [])]
            assert len(names) == len(set(names)), names
            # pdg refuses a variable set both plainly and as a file.
            assert not [n for n in names if f"{n}_FILE" in names], names
            seen.update(n for n in names if n.startswith("PDG_"))
    assert seen
    assert sorted(seen - known) == []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gateways_leave_the_log_to_the_one_writer(scenario: str) -> None:
    docs = rendered(scenario)
    gateway = one(docs, "Deployment", RELEASE)
    writer = one(docs, "Deployment", f"{RELEASE}-writer")
    (gw,) = containers(gateway)
    (wr,) = containers(writer)
    assert [*gw["command"], *gw["args"]] == ["pdg", "serve"]
    assert [*wr["command"], *wr["args"]] == ["pdg", "worker"]
    assert env_of(gw)["PDG_LEDGER_RUN_WRITER"] == "false"
    assert writer["spec"]["replicas"] == 1
    # A second writer would only stand by on the lock: a rolling update
    # starts the new one before the old one lets go.
    assert writer["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    # The migrations hook ran; the pods do not migrate.
    for container in (gw, wr):
        assert env_of(container)["PDG_AUTO_MIGRATE"] == "false"
    assert "PDG_SIGNING_KEY_FILE" not in env_of(gw)  # token keys shared through the database
    # The keys that must be one on every pod come from one Secret entry each.
    pods = [gateway, writer, *[d for d in docs if d["kind"] == "CronJob"]]
    for variable in (
        "PDG_LEDGER_SIGNING_KEY_FILE",
        "PDG_LEDGER_LOG_KEY_FILE",
        "PDG_PERSONAL_DIGEST_KEY_FILE",
    ):
        sources = {file_source(doc, containers(doc)[0], env_of(containers(doc)[0])[variable]) for doc in pods}
        assert len(sources) == 1, (variable, sources)
        ((kind, _name, _key),) = sources
        assert kind == "Secret"
    # The gateways' grace period covers the drain, the calls in flight and
    # the supervisor's margin.
    env = env_of(gw)
    spec = pod_spec(gateway)
    needed = float(env["PDG_DRAIN_SECONDS"]) + float(env["PDG_SHUTDOWN_SECONDS"]) + 10
    assert spec["terminationGracePeriodSeconds"] > needed
    probes = {name: gw[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {p["path"] for p in probes.values()} == {"/healthz", "/readyz"}
    assert probes["readinessProbe"]["path"] == "/readyz"
    ports = {p["name"] for p in gw["ports"]}
    assert {p["port"] for p in probes.values()} <= ports


def test_no_replicas_while_the_autoscaler_scales() -> None:
    docs = rendered("everything")
    gateway = one(docs, "Deployment", RELEASE)
    assert "replicas" not in gateway["spec"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RELEASE}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == "50%"
    assert "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]

    without = one(rendered("replicas-without-hpa"), "Deployment", RELEASE)
    assert without["spec"]["replicas"] == 3


def test_migrations_run_as_a_hook_before_install_and_upgrade() -> None:
    docs = rendered("defaults")
    job = one(docs, "Job")
    hook = job["metadata"]["annotations"]
    assert hook["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert hook["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    (container,) = containers(job)
    assert [*container["command"], *container["args"]] == ["pdg", "db", "upgrade"]
    # It runs before the release's own Secret exists: it reads a hook Secret
    # made just before it (a lower weight) ...
    source = file_source(job, container, env_of(container)["PDG_DATABASE_URL_FILE"])
    assert source[:2] == ("Secret", f"{RELEASE}-migrations")
    secret = one(docs, "Secret", f"{RELEASE}-migrations")
    early = secret["metadata"]["annotations"]
    assert early["helm.sh/hook"] == hook["helm.sh/hook"]
    assert int(early["helm.sh/hook-weight"]) < int(hook["helm.sh/hook-weight"])
    assert base64.b64decode(secret["data"][source[2]]).decode() == SECRETS["databaseUrl"]
    # ... and no ServiceAccount of the release (it does not exist yet either).
    assert "serviceAccountName" not in pod_spec(job)

    # With a Secret of one's own, the Job reads that.
    own = one(rendered("existing-secret"), "Job")
    (container,) = containers(own)
    assert file_source(own, container, env_of(container)["PDG_DATABASE_URL_FILE"]) == (
        "Secret",
        "pdg-prod",
        OWN_KEYS["databaseUrl"],
    )


def test_checksums_roll_the_pods_when_settings_or_secrets_change(chart: helm.Chart) -> None:
    def checksums(values: dict[str, Any]) -> dict[str, tuple[str, str]]:
        docs = render(chart, values)
        out = {}
        for name in (RELEASE, f"{RELEASE}-writer"):
            notes = one(docs, "Deployment", name)["spec"]["template"]["metadata"]["annotations"]
            out[name] = (notes["checksum/config"], notes["checksum/secret"])
        return out

    base = SCENARIOS["defaults"]
    first = checksums(base)
    assert checksums(base) == first  # the same values, the same pods
    settings = checksums(merged(base, {"config": {"proxy": {"pool_size": 400}}}))
    secrets = checksums(merged(base, {"secret": {"databaseUrl": "postgresql+asyncpg://pdg:new@pg2/pdg"}}))
    for name, (config_sum, secret_sum) in first.items():
        assert settings[name] == (settings[name][0], secret_sum), name
        assert settings[name][0] != config_sum, name
        assert secrets[name] == (config_sum, secrets[name][1]), name
        assert secrets[name][1] != secret_sum, name


# == bad values ============================================================================


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": 2},  # not a value of this chart
        {"gateway": {"replicas": -1}},
        {"gateway": {"workers": 0}},
        {"gateway": {"drainSeconds": "5"}},
        {"image": {"pullPolicy": "Sometimes"}},
        {"service": {"type": "ExternalName"}},
        {"config": {"server": {"port": 9000}}},  # the chart's to set
        {"config": {"ledger": {"run_writer": True}}},
        {"config": {"storage": {"redis_url": "redis://elsewhere"}}},
        {"config": {"data_dir": "/srv"}},
        {"secret": {"personalDigestKey": "too-short"}},
        {"secret": {"ledgerLogKey": "not a PEM"}},
        {"gateway": {"podDisruptionBudget": {"minAvailable": "half"}}},
        {"metrics": {"prometheusRule": {"backlogFraction": 1.5}}},
        {"metrics": {"serviceMonitor": {"interval": "often"}}},
        {"ingress": {"hosts": [{"host": HOST, "paths": [{"path": "/", "pathType": "Sideways"}]}]}},
    ],
    ids=lambda v: json.dumps(v, sort_keys=True)[:60],
)
def test_the_schema_refuses_bad_values(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(chart, merged(SCENARIOS["defaults"], values))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"gateway": {"podDisruptionBudget": {"enabled": True, "minAvailable": 1, "maxUnavailable": 1}}},
            "set minAvailable or maxUnavailable, not both",
        ),
        ({"gateway": {"terminationGracePeriodSeconds": 25}}, "must exceed gateway.drainSeconds"),
        ({"metrics": {"token": {"enabled": True}}}, "secret.metricsToken is required"),
        (
            {"ingress": {"enabled": True}, "gateway": {"operationsPort": {"enabled": False}}},
            "would publish /metrics without a token",
        ),
        ({"secret": {"databaseUrl": ""}}, "secret.databaseUrl is required"),
        ({"secret": {"ledgerSigningKey": ""}}, "secret.ledgerSigningKey"),
    ],
)
def test_the_templates_refuse_inconsistent_values(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, merged(SCENARIOS["defaults"], values))


def test_one_pdb_field_at_a_time_is_accepted(chart: helm.Chart) -> None:
    for field, value in (("minAvailable", 0), ("maxUnavailable", "25%"), ("maxUnavailable", 2)):
        pdb = one(
            render(
                chart,
                merged(
                    SCENARIOS["defaults"],
                    {"gateway": {"podDisruptionBudget": {"enabled": True, field: value}}},
                ),
            ),
            "PodDisruptionBudget",
        )
        assert {k: v for k, v in pdb["spec"].items() if k != "selector"} == {field: value}
    # Neither: one pod at a time.
    pdb = one(
        render(chart, merged(SCENARIOS["defaults"], {"gateway": {"podDisruptionBudget": {"enabled": True}}})),
        "PodDisruptionBudget",
    )
    assert pdb["spec"]["maxUnavailable"] == 1


# == what pdg makes of it ==================================================================


def file_source(doc: Manifest, container: dict[str, Any], path: str) -> tuple[str, str, str]:
    """Where a file the container reads comes from: ``(kind, name, key)``."""
    volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}
    for mount in container["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix) :]
        volume = volumes[mount["name"]]
        if "secret" in volume:
            items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
            return "Secret", volume["secret"]["secretName"], items.get(rest, rest)
        if "configMap" in volume:
            return "ConfigMap", volume["configMap"]["name"], rest
    raise AssertionError(f"{path} is in no mounted ConfigMap or Secret")


def settings_of(
    doc: Manifest, docs: tuple[Manifest, ...], tmp_path: Path, extra: tuple[Manifest, ...] = ()
) -> Settings:
    """The settings pdg builds in the pod's (first) container: its mounts laid
    out under ``tmp_path`` from the rendered ConfigMaps and Secrets, its
    variables pointed there, then pdg's own loader."""
    container = containers(doc)[0]
    sources = {(d["kind"], d["metadata"]["name"]): d for d in (*docs, *extra)}
    volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}
    root = tmp_path / doc["metadata"]["name"]
    for mount in container["volumeMounts"]:
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            for key, text in sources["ConfigMap", volume["configMap"]["name"]]["data"].items():
                (target / key).write_text(text)
        elif "secret" in volume and ("Secret", volume["secret"]["secretName"]) in sources:
            data = sources["Secret", volume["secret"]["secretName"]]["data"]
            items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                (target / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
    env = {}
    for name, value in env_of(container).items():
        mounted = any(value.startswith(m["mountPath"]) for m in container["volumeMounts"])
        env[name] = str(root / value.lstrip("/")) if mounted else value
    return load_settings(env=env)


def test_pdg_reads_the_settings_and_keys_the_chart_gives_each_pod(tmp_path: Path) -> None:
    docs = rendered("everything")
    gateway = settings_of(one(docs, "Deployment", RELEASE), docs, tmp_path)
    writer = settings_of(one(docs, "Deployment", f"{RELEASE}-writer"), docs, tmp_path)
    audit = settings_of(one(docs, "CronJob"), docs, tmp_path)
    migrations = settings_of(one(docs, "Job"), docs, tmp_path)

    server = gateway.server
    assert (server.host, server.port, server.workers) == ("0.0.0.0", 8080, 2)  # noqa: S104
    assert (server.drain_seconds, server.shutdown_seconds) == (5, 15)
    assert (server.metrics_listen, server.admin_listen) == ("0.0.0.0:9090", "0.0.0.0:8081")
    assert server.metrics_token == "m-token"
    assert server.trusted_proxies == ("10.0.0.0/8",)
    assert server.auto_migrate is False
    assert gateway.ledger.run_writer is False
    assert gateway.key_passphrase == b"k-passphrase"
    assert gateway.shared_signing_keys  # no per-pod token key
    assert gateway.proxy.client_certificates["city-bus"].cert_file == "/etc/pdg/upstream/tls.crt"
    for settings in (gateway, writer, audit):
        assert settings.storage.database_url == SECRETS["databaseUrl"]
        assert settings.storage.redis_url == SECRETS["redisUrl"]
        # The chart's TOML file, as pdg reads it.
        assert (settings.ledger.max_backlog, settings.billing.time_zone) == (200000, "UTC")
        assert settings.logging.format == "json"
        assert settings.public_url == f"https://{HOST}"
        assert settings.log_origin == f"{HOST}/pdg-ledger"
    assert migrations.storage.database_url == SECRETS["databaseUrl"]

    # The keys load with pdg's own loaders, the same on every pod.
    _key, alg = open_private_pem(gateway.ledger_key_path.read_bytes(), None)
    assert alg == "ES256"
    assert signer_from_file(gateway.log_key_path, gateway.log_origin).name == f"{HOST}/pdg-ledger"
    assert read_key(gateway.personal_key_path) == SECRETS["personalDigestKey"].encode()
    for settings in (writer, audit):
        assert settings.ledger_key_path.read_bytes() == gateway.ledger_key_path.read_bytes()
        assert settings.log_key_path.read_bytes() == gateway.log_key_path.read_bytes()
        assert read_key(settings.personal_key_path) == read_key(gateway.personal_key_path)


def test_a_secret_of_ones_own_is_read_by_its_key_names(tmp_path: Path) -> None:
    docs = rendered("existing-secret")
    own = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "pdg-prod"},
        "data": {
            OWN_KEYS[field]: base64.b64encode(value.encode()).decode()
            for field, value in {**SECRETS, "metricsToken": "own-token"}.items()
        },
    }
    gateway = settings_of(one(docs, "Deployment", RELEASE), docs, tmp_path, extra=(own,))
    assert gateway.storage.database_url == SECRETS["databaseUrl"]
    assert gateway.server.metrics_token == "own-token"
    # The operations and admin ports off: everything on the public port.
    assert (gateway.server.metrics_listen, gateway.server.admin_listen) == ("", "")
    (container,) = containers(one(docs, "Deployment", RELEASE))
    assert container["livenessProbe"]["httpGet"]["port"] == "http"
    monitor = one(docs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["authorization"]["credentials"] == {"name": "pdg-prod", "key": "scrape-token"}


# == the Prometheus operator's kinds, by hand ================================================


DURATION = re.compile(r"([0-9]+(ms|s|m|h))+")
ALERTS = {
    "PdgLedgerBacklogHigh",
    "PdgLedgerBacklogGrowing",
    "PdgLedgerWriterLagging",
    "PdgLedgerCheckpointStale",
    "PdgQuotaStoreDown",
    "PdgDatabaseDown",
    "PdgUpstreamErrors",
    "PdgAuditVerifyFailed",
}


def test_the_service_monitor_scrapes_the_gateways_with_their_token() -> None:
    docs = rendered("everything")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    service = one(docs, "Service")
    gateway = one(docs, "Deployment", RELEASE)
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "operations"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert DURATION.fullmatch(endpoint["interval"])
    assert DURATION.fullmatch(endpoint["scrapeTimeout"])
    credentials = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer"
    secret = one(docs, "Secret", credentials["name"])
    assert base64.b64decode(secret["data"][credentials["key"]]).decode() == "m-token"

    # Without a token, no authorization.
    plain = render_with({"metrics": {"serviceMonitor": {"enabled": True}}})
    (endpoint,) = one(plain, "ServiceMonitor")["spec"]["endpoints"]
    assert "authorization" not in endpoint


def render_with(values: dict[str, Any]) -> list[Manifest]:
    with helm.Chart.load(CHART) as loaded:
        return render(loaded, merged(SCENARIOS["defaults"], values))


def rules_of(docs: tuple[Manifest, ...] | list[Manifest]) -> list[dict[str, Any]]:
    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    groups = rule["spec"]["groups"]
    assert groups
    assert len({g["name"] for g in groups}) == len(groups)
    return [r for g in groups for r in g["rules"]]


def test_every_alert_says_what_it_means_and_what_to_do() -> None:
    docs = rendered("everything")
    rules = rules_of(docs)
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert isinstance(rule["expr"], str), rule
        assert rule["expr"].strip(), rule
        assert DURATION.fullmatch(rule["for"]), rule
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        notes = rule["annotations"]
        assert set(notes) == {"summary", "description"}, rule
        assert notes["summary"].strip(), rule
        assert len(notes["description"]) > 80, rule
        # What to do: every description tells whom or what to check.
        assert re.search(r"\b(Check|check|escalate)\b", notes["description"]), rule
        if rule["alert"] != "PdgAuditVerifyFailed":
            assert f'namespace="{NAMESPACE}",job="{RELEASE}"' in rule["expr"], rule
    # The backlog threshold follows ledger.max_backlog (200000 here).
    high = next(r for r in rules if r["alert"] == "PdgLedgerBacklogHigh")
    assert high["expr"].endswith("> 100000")
    # The audit alert watches the CronJob's Jobs, scheduled or made by hand.
    failed = next(r for r in rules if r["alert"] == "PdgAuditVerifyFailed")
    (pattern,) = re.findall(r'job_name=~"([^"]+)"', failed["expr"])
    cronjob = one(docs, "CronJob")["metadata"]["name"]
    assert re.fullmatch(pattern, f"{cronjob}-29123456")
    assert re.fullmatch(pattern, f"{cronjob}-manual")
    assert not re.fullmatch(pattern, f"{RELEASE}-migrations")
    # Without the CronJob there is nothing to alert on.
    plain = render_with({"metrics": {"prometheusRule": {"enabled": True}}})
    assert {r["alert"] for r in rules_of(plain)} == ALERTS - {"PdgAuditVerifyFailed"}


def test_the_audit_cronjob_fails_once_on_a_bad_record() -> None:
    cronjob = one(rendered("everything"), "CronJob")
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = containers(cronjob)
    assert [*container["command"], *container["args"]] == ["pdg", "audit", "verify"]
    assert len(cronjob["metadata"]["name"]) <= 52  # its Jobs add 11 characters


def dashboard_of(docs: tuple[Manifest, ...]) -> dict[str, Any]:
    configmap = one(docs, "ConfigMap", f"{RELEASE}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    ((name, text),) = configmap["data"].items()
    assert name.endswith(".json")
    board: dict[str, Any] = json.loads(text)
    return board


def panels_of(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def test_the_dashboard_has_the_panels_operators_look_for() -> None:
    board = dashboard_of(rendered("everything"))
    titles = " | ".join(p["title"] for p in panels_of(board))
    for wanted in (
        "Calls by outcome",
        "Calls by dataset and purpose",
        "Gateway overhead (p50, p95, p99)",
        "Upstream latency (p50, p95, p99)",
        "Refusals by code",
        "Quota refusals by pool",
        "Log backlog",
        "Writer lag",
        "Newest checkpoint age",
        "Redis and database up",
        "Tokens issued by method",
        "Token refusals by code",
    ):
        assert wanted in titles, wanted
    quantiles = [
        t["expr"] for p in panels_of(board) if "p50, p95, p99" in p["title"] for t in p.get("targets", [])
    ]
    assert len(quantiles) == 6
    assert all(re.match(r"histogram_quantile\(0\.(5|95|99), .*_bucket\{", q) for q in quantiles), quantiles
    assert len({p["id"] for p in panels_of(board)}) == len(panels_of(board))


# == PromQL against a live gateway ===========================================================

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")
#: A Grafana variable's query: ``label_values(<PromQL>, <label>)``.
_LABEL_VALUES = re.compile(r"label_values\((.*),\s*\w+\s*\)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}
_HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once
    strings, label matchers, ranges and grouping clauses are gone, that are
    neither a function or aggregation (followed by a parenthesis) nor a
    keyword."""
    text = _GROUPING.sub(" ", _RANGE.sub(" ", _SELECTOR.sub(" ", _STRING.sub('""', expr))))
    names = set()
    for match in _IDENTIFIER.finditer(text):
        if text[match.end() :].lstrip().startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, dataset) (rate(pdg_a_seconds_bucket{job="x",c=~"a|b"}'
        "[$__rate_interval]))) > on (job) group_left (x) max(pdg_b) and kube_c{n='y'} unless pdg_d offset 5m"
    )
    assert metric_names(expr) == {"pdg_a_seconds_bucket", "pdg_b", "kube_c", "pdg_d"}


def exported_families(exposition: str) -> dict[str, str]:
    """``# TYPE`` (and ``# HELP``) names of a Prometheus text exposition, with
    their types."""
    families: dict[str, str] = {}
    for line in exposition.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "#" and parts[1] in ("TYPE", "HELP"):
            kind = parts[3] if parts[1] == "TYPE" and len(parts) > 3 else ""
            families[parts[2]] = kind or families.get(parts[2], "")
    return families


def exported(name: str, families: dict[str, str]) -> bool:
    if name in families:
        return True
    for part in _HISTOGRAM_PARTS:
        if name.endswith(part) and families.get(name.removesuffix(part)) in ("histogram", "summary"):
            return True
    return False


# The exported names do not depend on the backend: the embedded one suffices.
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
async def test_dashboard_and_alerts_name_only_metrics_the_gateway_exports(
    world_factory: WorldFactory,
) -> None:
    docs = rendered("everything")
    board = dashboard_of(docs)
    dashboard_exprs = [t["expr"] for p in panels_of(board) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = _LABEL_VALUES.fullmatch(variable["definition"])
            assert query is not None, variable
            dashboard_exprs.append(query.group(1))
    rule_exprs = [r["expr"] for r in rules_of(docs)]

    world = await world_factory()
    ds, _lic, _app, token = await world.licensed()
    status, body, _ = await world.call(f"/data/{ds['id']}/records", token)
    assert status == 200, body
    async with world.client.get("/metrics") as resp:
        assert resp.status == 200
        families = exported_families(await resp.text())

    missing: dict[str, set[str]] = {}
    for source, exprs, others in (("dashboard", dashboard_exprs, ()), ("alerts", rule_exprs, ("kube_",))):
        names = set().union(*(metric_names(e) for e in exprs))
        assert any(n.startswith("pdg_") for n in names), source
        foreign = {n for n in names if not n.startswith(("pdg_", *others))}
        assert foreign == set(), f"{source} reads metrics of others: {sorted(foreign)}"
        unknown = {n for n in names if n.startswith("pdg_") and not exported(n, families)}
        if unknown:
            missing[source] = unknown
    assert missing == {}, f"not exported by the gateway: {missing}"
