// The TypeScript SDK's stdio client driving exai-bridge, step by step, for test_bridge_ts.py.
//
//   node client.mjs <bridge command> [args...]
//
// Prints one JSON line per step on stdout; before steps that need the test to act (switch the
// fake provider, restart the router, watch the instance) it prints {"wait": ...} and reads one
// line from stdin. EXAI_BRIDGE_* come from this process's environment.
import { createInterface } from "node:readline";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const wait = async (what) => {
  say({ wait: what });
  const next = await lines.next();
  if (next.done) throw new Error(`stdin closed while waiting for ${what}`);
};

const [command, ...args] = process.argv.slice(2);
const transport = new StdioClientTransport({ command, args, env: { ...process.env }, stderr: "inherit" });
const client = new Client({ name: "ts-stdio", version: "1" });
await client.connect(transport);
say({ step: "connected", protocol: transport.protocolVersion ?? null });

const tools = await client.listTools();
say({ step: "tools", names: tools.tools.map((t) => t.name) });

const status = async () => (await client.callTool({ name: "status", arguments: {} })).structuredContent;
say({ step: "status", status: await status() });

await wait("slow provider");
const progress = [];
const slow = await client.callTool({ name: "chat", arguments: { prompt: "take your time" } }, undefined, {
  onprogress: (p) => progress.push(p.message ?? String(p.progress)),
});
say({ step: "progress", isError: slow.isError ?? false, progress });

await wait("hanging provider");
const abort = new AbortController();
const hanging = client
  .callTool({ name: "chat", arguments: { prompt: "never mind" } }, undefined, { signal: abort.signal })
  .then(() => "answered", (err) => `rejected: ${err.message}`);
await wait("call running");
abort.abort("the user changed their mind");
say({ step: "cancelled", outcome: await hanging });

await wait("router restarted");
say({ step: "status2", status: await status() });

await client.close();
say({ step: "done" });
process.exit(0);
