import json, os, sys
p = sys.argv[1]; good = []
for line in open(p):
    try: json.loads(line); good.append(line if line.endswith("\n") else line + "\n")
    except ValueError: pass
tmp = p + ".tmp"; open(tmp, "w").writelines(good); os.replace(tmp, p)
print(f"distilled records: {len(good)}")
