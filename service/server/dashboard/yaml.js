// A small YAML emitter for a job spec (any JSON value): block mappings, flow lists of scalars, strings
// quoted when PyYAML would otherwise read them back as something else.
const PLAIN = /^[A-Za-z_][\w./-]*$/;
const SPECIAL = /^(null|true|false|yes|no|on|off|y|n)$/i;

export function toYaml(value) {
  return block(value, "").join("\n") + "\n";
}

function block(value, indent) {
  if (Array.isArray(value)) {
    return value.flatMap((item) => nested(`${indent}-`, item, indent + "  ", true));
  }
  return Object.entries(value).flatMap(([key, item]) => nested(`${indent}${scalar(key)}:`, item, indent + "  "));
}

// "head" followed by item: on the same line when it is a scalar or an empty or flat collection.
function nested(head, item, indent, inList = false) {
  if (!isCollection(item) || isEmpty(item)) return [`${head} ${flow(item)}`];
  if (Array.isArray(item) && !item.some(isCollection)) return [`${head} ${flow(item)}`];
  const lines = block(item, indent);
  if (inList) return [`${head} ${lines[0].trimStart()}`, ...lines.slice(1)];
  return [head, ...lines];
}

function flow(value) {
  if (Array.isArray(value)) return `[${value.map(flow).join(", ")}]`;
  if (isCollection(value)) return "{}";
  return scalar(value);
}

function scalar(value) {
  if (value === null || value === undefined) return "null";
  if (typeof value === "boolean") return String(value);
  if (typeof value === "number") {
    if (Number.isNaN(value)) return ".nan";
    if (!Number.isFinite(value)) return value > 0 ? ".inf" : "-.inf";
    // PyYAML (YAML 1.1) reads 1e-8 as a string: a float's exponent form needs a dot.
    return String(value).replace(/^(-?\d+)e/, "$1.0e");
  }
  return PLAIN.test(value) && !SPECIAL.test(value) ? value : JSON.stringify(value);
}

function isCollection(value) {
  return value !== null && typeof value === "object";
}

function isEmpty(value) {
  return Array.isArray(value) ? value.length === 0 : Object.keys(value).length === 0;
}
