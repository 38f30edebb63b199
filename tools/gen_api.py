#!/usr/bin/env python3
"""gen_api.py — generates everything derived from runtime/api.def.

Usage: gen_api.py API_DEF SRC_ROOT OUT_DIR

Writes (OUT_DIR is a build directory; the others are committed files that are
rewritten only when their content changes):
  OUT_DIR/pie_api_host.h     host prototypes in wasm2c's calling convention,
                             force-included when compiling an inferlet
  OUT_DIR/pie_api_table.c    the import allowlist with exact wasm types, and
                             the entry wrappers inferlets call (stack check)
  SRC_ROOT/sdk/c/pie_api.h   the guest SDK's raw header
  SRC_ROOT/docs/api.md       the API reference
Python standard library only.
"""
import hashlib
import os
import re
import sys

WASM = {"int32_t": "i32", "uint32_t": "i32", "int64_t": "i64",
        "uint64_t": "i64", "float": "f32", "double": "f64"}
W2C = {"i32": "uint32_t", "i64": "uint64_t", "f32": "float", "f64": "double"}
MODULES = {"pie": "pie", "wasi": "wasi_snapshot_preview1"}


def die(msg):
    sys.stderr.write("gen_api.py: " + msg + "\n")
    sys.exit(1)


def wasm_type(ctype, where):
    ctype = ctype.strip()
    if "*" in ctype:
        return "i32"
    base = ctype.replace("const", "").strip()
    if base not in WASM:
        die("%s: unsupported type '%s'" % (where, ctype))
    return WASM[base]


def parse_params(text, where):
    text = text.strip()
    if text in ("", "void"):
        return []
    out = []
    for p in text.split(","):
        m = re.match(r"^\s*(.*?[\s\*])(\w+)\s*$", p)
        if not m:
            die("%s: bad parameter '%s'" % (where, p))
        out.append((m.group(1).strip(), m.group(2), wasm_type(m.group(1), where)))
    return out


def parse(path):
    groups, fns, version = [], [], None
    fn_re = re.compile(r"^(fn|wasi)\s+(\w+\s+)?([\w\s\*]+?)\s*\b(\w+)\((.*)\)\s*\|\s*(.*)$")
    for ln, line in enumerate(open(path, encoding="utf-8"), 1):
        line = line.rstrip("\n")
        where = "%s:%d" % (path, ln)
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("api_version "):
            version = int(line.split()[1])
        elif line.startswith("group "):
            m = re.match(r"^group\s+(\w+)\s+(\w+)\s*\|\s*(.*)$", line)
            if not m:
                die("%s: bad group line" % where)
            groups.append({"name": m.group(1), "impl": m.group(2), "doc": m.group(3)})
        elif line.startswith("fn ") or line.startswith("wasi "):
            kind = line.split()[0]
            if kind == "fn":
                m = re.match(r"^fn\s+(\w+)\s+(.*?)\s*\b(\w+)\((.*)\)\s*\|\s*(.*)$", line)
                if not m:
                    die("%s: bad fn line" % where)
                group, ret, name, params, doc = m.groups()
            else:
                m = re.match(r"^wasi\s+(.*?)\s*\b(\w+)\((.*)\)\s*\|\s*(.*)$", line)
                if not m:
                    die("%s: bad wasi line" % where)
                ret, name, params, doc = m.groups()
                group = "wasi"
            if not any(g["name"] == group for g in groups):
                die("%s: unknown group %s" % (where, group))
            ret = ret.strip()
            fns.append({"module": "pie" if kind == "fn" else "wasi",
                        "group": group, "ret": ret, "name": name,
                        "wret": None if ret == "void" else wasm_type(ret, where),
                        "params": parse_params(params, where), "doc": doc})
        else:
            die("%s: cannot parse '%s'" % (where, line))
    if version is None:
        die("%s: no api_version line" % path)
    names = [(f["module"], f["name"]) for f in fns]
    if len(set(names)) != len(names):
        die("duplicate function name")
    return version, groups, fns


def mangle(module, name):
    # wasm2c 1.0.32: Z_<module>Z_<name>, with 'Z' escaped as "ZZ".
    return "Z_%sZ_%s" % (module.replace("Z", "ZZ"), name.replace("Z", "ZZ"))


def sig(f):
    return "".join(p[2][1] if False else p[2] for p in f["params"])


def entry_name(mangled):
    return "pie__entry_" + mangled


def noreturn(f):
    return " __attribute__((noreturn))" if f["name"] in ("exit", "proc_exit") else ""


def entry_wrappers(fns):
    """Host-side wrappers that compiled inferlets call instead of the host
    functions: each checks the fiber's remaining stack before any host code
    can take a lock (rt_internal.h, pie__rt_entry_check), then marks the
    instance as in host code for the call (pie__rt_host_enter), so signal
    handlers unwind only guest code and the libc leaves it calls."""
    o = ["", "/* Entry wrappers: what compiled inferlets call (pie_api_host.h renames",
         " * each import under PIE_RT_INFERLET). They live in section pie_rt_entry,",
         " * where wasm_rt.c's SIGSEGV handler may unwind a stack overflow: no lock",
         " * is held there yet. */"]
    for f in fns:
        mod = MODULES[f["module"]]
        name = mangle(mod, f["name"])
        ret = "void" if f["wret"] is None else W2C[f["wret"]]
        params = ["struct Z_%s_instance_t *ctx" % mod] + [
            "%s a%d" % (W2C[p[2]], k) for k, p in enumerate(f["params"])]
        args = ["ctx"] + ["a%d" % k for k in range(len(f["params"]))]
        call = "%s(%s);" % (name, ", ".join(args))
        o.append("PIE_RT_ENTRY%s %s %s(%s)" % (noreturn(f), ret, entry_name(name),
                                             ", ".join(params)))
        o.append("{")
        o.append("    pie_rt_instance *i = (pie_rt_instance *)(void *)ctx;")
        o.append("    pie__rt_entry_check(i, PIE_RT_HOST_STACK);")
        if noreturn(f):
            o.append("    (void)pie__rt_host_enter(i);")
            o.append("    %s" % call)
            o.append("}")
            continue
        o.append("    int g = pie__rt_host_enter(i);")
        if ret == "void":
            o.append("    %s" % call)
            o.append("    pie__rt_host_leave(i, g);")
        else:
            o.append("    %s r = %s" % (ret, call))
            o.append("    pie__rt_host_leave(i, g);")
            o.append("    return r;")
        o.append("}")
    return o


def host_header(version, fns, digest):
    o = ["/* Generated by tools/gen_api.py from runtime/api.def: do not edit. */",
         "/* Host functions of the pie inferlet API v%d in wasm2c 1.0.32's calling" % version,
         " * convention: first argument the instance context, wasm i32 -> uint32_t,",
         " * i64 -> uint64_t. Force-included when compiling an inferlet, so a",
         " * mistyped import is a compile error. */",
         "#ifndef PIE_API_HOST_H", "#define PIE_API_HOST_H", "#include <stdint.h>",
         "#define PIE_API_VERSION %d" % version,
         "#define PIE_API_DIGEST \"%s\"" % digest,
         "struct Z_pie_instance_t;", "struct Z_wasi_snapshot_preview1_instance_t;"]
    o += ["#ifdef PIE_RT_INFERLET",
          "/* An inferlet calls each import through its entry wrapper",
          " * (pie_api_table.c), which checks the fiber's stack first. */"]
    for f in fns:
        name = mangle(MODULES[f["module"]], f["name"])
        o.append("#define %s %s" % (name, entry_name(name)))
    o.append("#endif")
    for f in fns:
        mod = MODULES[f["module"]]
        ret = "void" if f["wret"] is None else W2C[f["wret"]]
        args = ["struct Z_%s_instance_t *" % mod] + [W2C[p[2]] for p in f["params"]]
        o.append("%s %s(%s)%s;" % (ret, mangle(mod, f["name"]), ", ".join(args),
                                   noreturn(f)))
    o.append("#endif")
    return "\n".join(o) + "\n"


def table_c(version, groups, fns, digest):
    impl = {g["name"]: g["impl"] for g in groups}
    o = ["/* Generated by tools/gen_api.py from runtime/api.def: do not edit. */",
         '#include "runtime/rt_internal.h"', '#include "pie_api_host.h"', "",
         "/* Engine functions live in runtime/host_engine.c; without it (a build",
         " * without the control layer) they are weak and modules importing them",
         " * are rejected at load. */",
         "#ifndef PIE_HAVE_HOST_ENGINE"]
    for f in fns:
        if impl[f["group"]] == "engine":
            mod = MODULES[f["module"]]
            ret = "void" if f["wret"] is None else W2C[f["wret"]]
            args = ["struct Z_%s_instance_t *" % mod] + [W2C[p[2]] for p in f["params"]]
            o.append("__attribute__((weak)) %s %s(%s);" % (ret, mangle(mod, f["name"]), ", ".join(args)))
    o.append("#endif")
    o += entry_wrappers(fns)
    o += ["", "const pie_rt_api_import pie_rt_api_imports[] = {"]
    for f in fns:
        mod = MODULES[f["module"]]
        o.append('    {"%s", "%s", "%s", "%s", (void (*)(void))%s},' % (
            mod, f["name"], ",".join(p[2] for p in f["params"]), f["wret"] or "",
            mangle(mod, f["name"])))
    o += ["};",
          "const int pie_rt_api_n_imports = %d;" % len(fns),
          "const int pie_rt_api_version = %d;" % version,
          'const char pie_rt_api_digest[] = "%s";' % digest]
    return "\n".join(o) + "\n"


def enum_values(path, prefix):
    """PIE_E* / PIE_SAMPLER_* values parsed from a C enum, implicit or not."""
    vals, cur = [], -1
    text = open(path, encoding="utf-8").read()
    for m in re.finditer(r"\b(%s\w*)\s*(?:=\s*(-?\d+))?\s*,?" % prefix, text):
        if m.group(0).strip().endswith(("(", ")")):
            continue
        cur = int(m.group(2)) if m.group(2) is not None else cur + 1
        vals.append((m.group(1), cur))
    return vals


def sdk_header(version, groups, fns, src):
    errs = re.findall(r"\b(PIE_E[A-Z]+)\s*=\s*(-?\d+)",
                      open(os.path.join(src, "common/pie_err.h"), encoding="utf-8").read())
    text = open(os.path.join(src, "backend/backend.h"), encoding="utf-8").read()
    body = re.search(r"enum pie_sampler_kind\s*\{(.*?)\}", text, re.S).group(1)
    kinds, cur = [], -1
    for m in re.finditer(r"(PIE_(?:SAMPLER|PROBE)_\w+)\s*(?:=\s*(\d+))?", body):
        cur = int(m.group(2)) if m.group(2) else cur + 1
        kinds.append((m.group(1), cur))
    o = ["/*", " * pie_api.h — raw inferlet API v%d (guest side)." % version,
         " *", " * Generated by tools/gen_api.py from runtime/api.def: do not edit.",
         " * Pointers are offsets in this module's linear memory; the host checks",
         " * each one and traps the inferlet on a bad pointer. Handles are int32_t",
         " * (> 0); errors are negative PIE_E* codes. See docs/api.md.", " */",
         "#ifndef PIE_API_H", "#define PIE_API_H", "", "#include <stdint.h>", "",
         "#define PIE_API_VERSION %d" % version, ""]
    o.append("/* Error codes (common/pie_err.h). */")
    o.append("#ifndef PIE_ERR_H")
    for n, v in errs:
        o.append("#define %-18s (%s)" % (n, v))
    o.append("#endif")
    o.append("")
    o.append("/* Sampler and probe kinds for pie_forward_output (backend/backend.h). */")
    o.append("#ifndef PIE_BACKEND_H")
    for n, v in kinds:
        o.append("#define %-20s %d" % (n, v))
    o.append("#endif")
    o.append("")
    o.append('#define PIE_IMPORT_(n) __attribute__((import_module("pie"), import_name(#n)))')
    for g in groups:
        if g["name"] == "wasi":
            continue
        o.append("")
        o.append("/* ---- %s ---- */" % g["name"])
        for f in fns:
            if f["group"] != g["name"] or f["module"] != "pie":
                continue
            params = ", ".join("%s%s%s" % (t, "" if t.endswith("*") else " ", n)
                               for t, n, _ in f["params"]) or "void"
            nr = " __attribute__((noreturn))" if f["name"] == "exit" else ""
            o.append("/* %s */" % f["doc"])
            o.append("PIE_IMPORT_(%s)%s %s pie_%s(%s);" % (f["name"], nr, f["ret"], f["name"], params))
    o += ["", "#endif"]
    return "\n".join(o) + "\n"


def docs(version, groups, fns):
    o = ["# pie inferlet API v%d" % version, "",
         "Generated by `tools/gen_api.py` from `runtime/api.def`; do not edit.", "",
         "An inferlet is a wasm32-wasi command module. It imports the functions",
         "below from module `pie` (C: `#include \"pie_api.h\"`, each as `pie_NAME`)",
         "and the listed WASI calls; an upload importing anything else, or any of",
         "these with a different wasm type, is rejected before compilation.",
         "Pointers are offsets in the inferlet's linear memory and are bounds-checked",
         "(a bad one traps the instance). Handles are 32-bit; errors are negative",
         "`PIE_E*` codes (`common/pie_err.h`).", ""]
    for g in groups:
        o.append("## %s" % g["name"])
        o.append("")
        o.append(g["doc"])
        o.append("")
        o.append("| function | wasm type | description |")
        o.append("|---|---|---|")
        for f in fns:
            if f["group"] != g["name"]:
                continue
            params = ", ".join("%s%s%s" % (t, "" if t.endswith("*") else " ", n)
                               for t, n, _ in f["params"]) or "void"
            wt = "(%s) -> %s" % (" ".join(p[2] for p in f["params"]), f["wret"] or "()")
            mod = "" if f["module"] == "pie" else "wasi_snapshot_preview1."
            o.append("| `%s %s%s(%s)` | `%s` | %s |" % (f["ret"], mod, f["name"], params, wt,
                                                       f["doc"].replace("|", "\\|")))
        o.append("")
    return "\n".join(o)


def write_if_changed(path, text):
    try:
        if open(path, encoding="utf-8").read() == text:
            return
    except OSError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp%d" % os.getpid()
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    if len(sys.argv) != 4:
        die("usage: gen_api.py API_DEF SRC_ROOT OUT_DIR")
    path, src, out = sys.argv[1:]
    version, groups, fns = parse(path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]
    write_if_changed(os.path.join(out, "pie_api_host.h"), host_header(version, fns, digest))
    write_if_changed(os.path.join(out, "pie_api_table.c"), table_c(version, groups, fns, digest))
    write_if_changed(os.path.join(src, "sdk/c/pie_api.h"), sdk_header(version, groups, fns, src))
    write_if_changed(os.path.join(src, "docs/api.md"), docs(version, groups, fns))


main()
