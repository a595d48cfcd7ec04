// Runs @walkeros/core's getMappingValue on cases read from stdin (a JSON list of
// {value, input, event, collector}); prints one JSON list of results. "$code:" strings become
// functions as walkerOS's bundler makes them: the text after the prefix is the expression.
import { createRequire } from "node:module";
const require = createRequire(process.env.WALKEROS_CORE_DIR + "/");
const { getMappingValue } = require("@walkeros/core");

const logger = { error() {}, warn() {}, info() {}, debug() {}, json() {}, throw(m) { throw new Error(m); } };
logger.scope = () => logger;

function functions(spec) {
  if (typeof spec === "string") return spec.startsWith("$code:") ? new Function("return (" + spec.slice(6) + "\n);")() : spec;
  if (Array.isArray(spec)) return spec.map(functions);
  if (spec && typeof spec === "object") {
    const out = {};
    for (const [k, v] of Object.entries(spec)) out[k] = (k === "value") ? v : functions(v);
    return out;
  }
  return spec;
}
// undefined inside arrays is kept apart from null
function encode(value) {
  if (value === undefined) return { undefined: true };
  return { json: JSON.stringify(value, function (k, v) { return v === undefined && Array.isArray(this) ? "\u0000undefined" : v; }) };
}

let text = "";
process.stdin.on("data", (d) => (text += d));
process.stdin.on("end", async () => {
  const out = [];
  for (const c of JSON.parse(text)) {
    const collector = { ...c.collector, logger, status: { failed: 0 } };
    try {
      out.push(encode(await getMappingValue(c.input, functions(c.value), { event: c.event, collector })));
    } catch (e) {
      out.push({ error: String(e) });
    }
  }
  process.stdout.write(JSON.stringify(out));
});
