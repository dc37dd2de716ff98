// Validate Kubernetes custom resources against the schemas the @kubernetes-models packages
// publish (KEDA: keda.sh; Prometheus operator: monitoring.coreos.com), and report the fields
// those schemas do not know. tests/test_deploy_k8s.py runs it on every custom resource of every
// rendered overlay; no API server is needed.
//
//   node validate.mjs --modules DIR < objects.json
//
// DIR is where `npm ci` installed this folder's package-lock.json (tools/ensure_tools.sh puts
// it in ~/.cache/callerid/npm/k8s-crd-validate-<lockfile hash>, outside the checkout).
// objects.json is a JSON array of objects. Prints a JSON array with one entry per object,
// {apiVersion, kind, name, errors: [text]}, and exits 0 when no object has an error, 1 when
// one has, 2 when the input or DIR cannot be used (one line on stderr).
//
// Why the unknown-field check works the way it does: the packages ship ajv validators
// compiled from the CRDs' OpenAPI schemas (no JSON schema files), and CRD schemas never say
// additionalProperties: false, so a misspelt field passes them; the API server would prune it
// (or, with strict field validation, reject it). A compiled validator reads every property its
// schema declares for an object (`data.spec`, `data.minReplicaCount`...) and walks the keys of
// an object whose schema is a map (additionalProperties: {...}). So each validator runs on a
// Proxy of the object that records what it reads: a key it neither read nor walked is unknown
// to the schema. An object it never looked into (x-kubernetes-preserve-unknown-fields) may hold
// any key, as on the API server.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

// API group -> the package that carries its schemas.
const PACKAGES = {
  "keda.sh": "@kubernetes-models/keda",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};

function fail(message) {
  process.stderr.write(`k8s_crd_validate: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const at = argv.indexOf("--modules");
  if (at < 0 || !argv[at + 1]) {
    fail("usage: node validate.mjs --modules DIR < objects.json");
  }
  return argv[at + 1];
}

function loader(modulesDir) {
  const require = createRequire(join(modulesDir, "package.json"));
  for (const name of Object.values(PACKAGES)) {
    try {
      require.resolve(`${name}/package.json`);
    } catch {
      fail(`${name} is not installed in ${modulesDir}: run \`bash tools/ensure_tools.sh\``);
    }
  }
  // The model class for apiVersion + kind, or a reason there is none.
  return (apiVersion, kind) => {
    const [group, version] = String(apiVersion).split("/");
    const pkg = PACKAGES[group];
    if (!pkg || !version) {
      return { reason: `no schema package for apiVersion ${apiVersion}` };
    }
    let models;
    try {
      models = require(`${pkg}/${group}/${version}`);
    } catch {
      return { reason: `${pkg} has no version ${apiVersion}` };
    }
    const model = models[kind];
    if (typeof model !== "function" || typeof model.prototype.validate !== "function") {
      return { reason: `${pkg} has no kind ${kind} in ${apiVersion}` };
    }
    return { model };
  };
}

// A Proxy of `root` (recursively) that records, per object, the keys read and whether its
// keys were listed. Returns the proxy and the notes, keyed by the original objects.
function watched(root) {
  const notes = new Map();
  const proxies = new WeakMap();
  const wrap = (value) => {
    if (value === null || typeof value !== "object") {
      return value;
    }
    let proxy = proxies.get(value);
    if (proxy === undefined) {
      const note = { read: new Set(), listed: false };
      notes.set(value, note);
      const saw = (key) => {
        if (typeof key === "string") {
          note.read.add(key);
        }
      };
      proxy = new Proxy(value, {
        get(target, key, receiver) {
          saw(key);
          return wrap(Reflect.get(target, key, receiver));
        },
        has(target, key) {
          saw(key);
          return Reflect.has(target, key);
        },
        getOwnPropertyDescriptor(target, key) {
          saw(key);
          return Reflect.getOwnPropertyDescriptor(target, key);
        },
        ownKeys(target) {
          note.listed = true;
          return Reflect.ownKeys(target);
        },
      });
      proxies.set(value, proxy);
    }
    return proxy;
  };
  return { proxy: wrap(root), notes };
}

function unknownFields(value, path, notes, found) {
  if (Array.isArray(value)) {
    value.forEach((item, index) => unknownFields(item, `${path}/${index}`, notes, found));
    return;
  }
  if (value === null || typeof value !== "object") {
    return;
  }
  const note = notes.get(value);
  if (note === undefined || note.listed || note.read.size === 0) {
    return; // never looked into (free-form), or a map: any key is allowed
  }
  for (const [key, child] of Object.entries(value)) {
    if (note.read.has(key)) {
      unknownFields(child, `${path}/${key}`, notes, found);
    } else {
      found.push(`${path}/${key}: unknown field (the schema has no such property)`);
    }
  }
}

function schemaErrors(model, object) {
  const { proxy, notes } = watched(object);
  const errors = [];
  try {
    // The model's validate() runs the compiled validator on `this`: here, the proxy.
    model.prototype.validate.call(proxy);
  } catch (error) {
    if (!Array.isArray(error?.errors)) {
      throw error;
    }
    for (const e of error.errors) {
      const allowed = e.keyword === "enum" ? ` ${JSON.stringify(e.params.allowedValues)}` : "";
      errors.push(`${e.instancePath || "/"}: ${e.message}${allowed}`);
    }
  }
  unknownFields(object, "", notes, errors);
  return errors;
}

function main() {
  const find = loader(parseArgs(process.argv.slice(2)));
  let objects;
  try {
    objects = JSON.parse(readFileSync(0, "utf8"));
  } catch (error) {
    fail(`stdin is not JSON: ${error.message}`);
  }
  if (!Array.isArray(objects)) {
    fail("stdin must hold a JSON array of objects");
  }
  const report = objects.map((object) => {
    const { apiVersion, kind } = object ?? {};
    const entry = { apiVersion, kind, name: object?.metadata?.name ?? null, errors: [] };
    const { model, reason } = find(apiVersion, kind);
    entry.errors = model ? schemaErrors(model, object) : [reason];
    return entry;
  });
  process.stdout.write(`${JSON.stringify(report, null, 1)}\n`);
  process.exit(report.some((entry) => entry.errors.length) ? 1 : 0);
}

main();
