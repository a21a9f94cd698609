"""Kubernetes' Pod Security Standards (kubernetes.io/docs/concepts/security/pod-security-standards/), the
checks that the manifests' pods could trip, as the admission controller applies them to a pod template.

Written from the published standard (version "latest", Kubernetes 1.30); the controller itself is Go code that
no test here can run.
"""

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE", "SETFCAP",
    "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def containers(spec: dict) -> list[dict]:
    """A pod spec's containers, init containers first."""
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def baseline(spec: dict) -> list[str]:
    """What keeps a pod spec out of a namespace enforcing the "baseline" level: one line per finding."""
    found = [f"{k}: true" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    found += [f"volume {v['name']}: hostPath" for v in spec.get("volumes", []) if "hostPath" in v]
    pod = spec.get("securityContext") or {}
    if (pod.get("seccompProfile") or {}).get("type") == "Unconfined":
        found.append("pod: seccompProfile Unconfined")
    for c in containers(spec):
        ctx = c.get("securityContext") or {}
        if ctx.get("privileged"):
            found.append(f"{c['name']}: privileged")
        if added := set((ctx.get("capabilities") or {}).get("add", [])) - BASELINE_CAPABILITIES:
            found.append(f"{c['name']}: adds capabilities {sorted(added)}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{c['name']}: hostPort")
        if (ctx.get("seccompProfile") or {}).get("type") == "Unconfined":
            found.append(f"{c['name']}: seccompProfile Unconfined")
    return found


def restricted(spec: dict) -> list[str]:
    """What keeps a pod spec out of a namespace enforcing the "restricted" level (baseline's findings too)."""
    found = baseline(spec)
    found += [f"volume {v['name']}: a kind restricted refuses" for v in spec.get("volumes", [])
              if not set(v) - {"name"} <= RESTRICTED_VOLUMES]  # fmt: skip
    pod = spec.get("securityContext") or {}
    pod_seccomp = (pod.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")
    if pod.get("runAsUser") == 0:
        found.append("pod: runAsUser 0")
    for c in containers(spec):
        ctx = c.get("securityContext") or {}
        name = c["name"]
        if ctx.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation not false")
        caps = ctx.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            found.append(f"{name}: does not drop ALL capabilities")
        if added := set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {sorted(added)}")
        non_root = ctx.get("runAsNonRoot", pod.get("runAsNonRoot"))
        if non_root is not True:
            found.append(f"{name}: runAsNonRoot not true")
        if ctx.get("runAsUser") == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = (ctx.get("seccompProfile") or {}).get("type")
        if not (seccomp in ("RuntimeDefault", "Localhost") or (seccomp is None and pod_seccomp)):
            found.append(f"{name}: no RuntimeDefault seccompProfile")
    return found
