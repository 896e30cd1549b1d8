// The current conversation as a request someone can run: curl, or Python with the mistralai SDK.
// The key is never copied: both read it from the MISTRAL_API_KEY environment variable.

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

export function curl(origin, body) {
  const plain = { ...body, stream: false };
  delete plain.stream_options;
  return [
    `curl ${origin}/v1/chat/completions`,
    `  -H "Content-Type: application/json"`,
    `  -H "Authorization: Bearer $MISTRAL_API_KEY"`,
    `  -d ${shellQuote(JSON.stringify(plain))}`,
  ].join(" \\\n");
}

// A JSON value as a Python literal.
function py(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return JSON.stringify(value);
  const inner = `${indent}    `;
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => inner + py(v, inner)).join(",\n")},\n${indent}]`;
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  return `{\n${entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${py(v, inner)}`).join(",\n")},\n${indent}}`;
}

export function python(origin, body) {
  const args = { ...body };
  delete args.stream;
  delete args.stream_options;
  const lines = [
    "import os",
    "",
    "try:",
    "    from mistralai.client import Mistral  # mistralai 2 and later",
    "except ImportError:",
    "    from mistralai import Mistral  # mistralai 1.x",
    "",
    `client = Mistral(api_key=os.environ.get("MISTRAL_API_KEY", ""), server_url=${JSON.stringify(origin)})`,
    "reply = client.chat.complete(",
  ];
  for (const [name, value] of Object.entries(args)) lines.push(`    ${name}=${py(value, "    ")},`);
  lines.push(")");
  lines.push("for choice in reply.choices:");
  lines.push("    print(choice.message.content)");
  return lines.join("\n");
}
