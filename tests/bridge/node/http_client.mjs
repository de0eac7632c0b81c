// The TypeScript SDK's Streamable HTTP client straight at the router (no bridge), step by
// step, for tests/bridge/test_ts_http.py.
//
//   node http_client.mjs <router /mcp URL> <bearer token>
//
// Prints one JSON line per step on stdout; before steps that need the test to act (switch the
// fake provider, watch the instance) it prints {"wait": ...} and reads one line from stdin.
import { createInterface } from "node:readline";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const wait = async (what) => {
  say({ wait: what });
  const next = await lines.next();
  if (next.done) throw new Error(`stdin closed while waiting for ${what}`);
};

const [url, token] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client({ name: "ts-http", version: "1" });
await client.connect(transport);
say({ step: "connected", session: transport.sessionId ?? null, protocol: transport.protocolVersion ?? null });

const tools = await client.listTools();
say({ step: "tools", names: tools.tools.map((t) => t.name) });

const status = async () => (await client.callTool({ name: "status", arguments: {} })).structuredContent;
say({ step: "status", status: await status() });

// Several calls of one session at once, each answered with its own result.
const many = await Promise.all(
  Array.from({ length: 8 }, (_, n) => client.callTool({ name: "chat", arguments: { prompt: `parallel ${n}` } })),
);
say({ step: "parallel", answers: many.map((r) => (r.isError ? "error" : r.structuredContent?.content ?? "")) });

await wait("slow provider");
const progress = [];
const slow = await client.callTool({ name: "chat", arguments: { prompt: "take your time" } }, undefined, {
  onprogress: (p) => progress.push(p.message ?? String(p.progress)),
  resetTimeoutOnProgress: true,
});
say({ step: "progress", isError: slow.isError ?? false, content: slow.structuredContent?.content ?? "", progress });

await wait("hanging provider");
const abort = new AbortController();
const hanging = client
  .callTool({ name: "chat", arguments: { prompt: "never mind" } }, undefined, { signal: abort.signal })
  .then(() => "answered", (err) => `rejected: ${err.message}`);
await wait("call running");
abort.abort("the user changed their mind");
say({ step: "cancelled", outcome: await hanging });

await wait("provider back");
say({ step: "status2", status: await status() });
await transport.terminateSession();
await client.close();
say({ step: "done" });
process.exit(0); // undici keeps idle keep-alive sockets (and so node) alive for a while
