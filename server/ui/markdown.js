// A small fixed subset of Markdown, built as DOM nodes from text: model output is never HTML.
// Fenced code blocks, headings (#), bullet and numbered lists, paragraphs, and inline `code`,
// **bold** and *italic*. Everything else, links and raw HTML included, stays literal text.

function inline(parent, text) {
  const pattern = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\n]+\*)/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    if (match.index > last) parent.append(text.slice(last, match.index));
    const token = match[0];
    let node;
    if (token.startsWith("`")) {
      node = document.createElement("code");
      node.textContent = token.slice(1, -1);
    } else if (token.startsWith("**")) {
      node = document.createElement("strong");
      node.textContent = token.slice(2, -2);
    } else {
      node = document.createElement("em");
      node.textContent = token.slice(1, -1);
    }
    parent.append(node);
    last = match.index + token.length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

function element(tag, text) {
  const node = document.createElement(tag);
  inline(node, text);
  return node;
}

export function render(text) {
  const root = document.createDocumentFragment();
  const lines = text.split("\n");
  let paragraph = [];
  let list = null;

  const flush = () => {
    if (paragraph.length) root.append(element("p", paragraph.join("\n")));
    paragraph = [];
    list = null;
  };

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^```\s*([\w+-]*)\s*$/);
    if (fence) {
      flush();
      const body = [];
      i++;
      while (i < lines.length && !/^```\s*$/.test(lines[i])) body.push(lines[i++]);
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      if (fence[1]) code.dataset.lang = fence[1];
      code.textContent = body.join("\n");
      pre.append(code);
      root.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,4})\s+(.*)$/);
    const bullet = line.match(/^\s*[-*]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    if (heading) {
      flush();
      // h3..h6 under the page's own h1/h2
      root.append(element(`h${Math.min(heading[1].length + 2, 6)}`, heading[2]));
    } else if (bullet || numbered) {
      const tag = bullet ? "ul" : "ol";
      if (paragraph.length) {
        root.append(element("p", paragraph.join("\n")));
        paragraph = [];
      }
      if (!list || list.tagName.toLowerCase() !== tag) {
        list = document.createElement(tag);
        root.append(list);
      }
      list.append(element("li", (bullet || numbered)[1]));
    } else if (line.trim() === "") {
      flush();
    } else {
      list = null;
      paragraph.push(line);
    }
  }
  flush();
  return root;
}
