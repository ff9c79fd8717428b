// The pure part of the CUDA architecture check (Note [CUDA architecture check] in cuda_arch.h): compiled
// into every build, CPU-only too, so the decision logic is tested without a GPU.
#include "fusedtrain/cuda_arch.h"

#include <c10/util/Exception.h>

#include <cctype>
#include <sstream>

namespace fusedtrain {
namespace cuda_arch {
namespace {

// Reads "X.Y[a|f][+PTX]"; false when `s` is anything else.
bool parse_one(const std::string& s, Target* t) {
  size_t i = 0;
  auto number = [&](int* out) {
    const size_t begin = i;
    int v = 0;
    while (i < s.size() && i - begin < 3 && std::isdigit(static_cast<unsigned char>(s[i]))) {
      v = v * 10 + (s[i++] - '0');
    }
    *out = v;
    return i > begin;
  };
  if (!number(&t->major) || i >= s.size() || s[i++] != '.' || !number(&t->minor)) return false;
  t->variant = 0;
  if (i < s.size() && (s[i] == 'a' || s[i] == 'f')) t->variant = s[i++];
  const std::string rest = s.substr(i);
  t->ptx = rest == "+PTX";
  return rest.empty() || t->ptx;
}

// Whether code for `t` runs on major.minor; `forward`: plain PTX, which the driver compiles for later majors too.
bool runs_on(const Target& t, int major, int minor, bool forward) {
  if (t.variant == 'a') return major == t.major && minor == t.minor;
  if (forward && t.variant == 0 && major > t.major) return true;
  return major == t.major && minor >= t.minor;
}

}  // namespace

std::vector<Target> parse(const std::string& arch_list) {
  std::vector<Target> out;
  std::string token;
  std::istringstream in(arch_list);
  while (std::getline(in, token, ';')) {
    std::istringstream words(token);
    std::string word;
    while (words >> word) {
      Target t;
      TORCH_CHECK(parse_one(word, &t), "fusedtrain: malformed CUDA architecture '", word, "' in '", arch_list,
                  "' (expected entries like 8.6, 9.0+PTX or 9.0a)");
      out.push_back(t);
    }
  }
  return out;
}

Coverage coverage(const std::string& arch_list, int major, int minor) {
  Coverage best = Coverage::kNone;
  for (const Target& t : parse(arch_list)) {
    if (runs_on(t, major, minor, false)) return Coverage::kCubin;
    if (t.ptx && runs_on(t, major, minor, true)) best = Coverage::kPtx;
  }
  return best;
}

std::string describe(const std::string& arch_list) {
  std::ostringstream cubins, ptx;
  int n_cubins = 0, n_ptx = 0;
  for (const Target& t : parse(arch_list)) {
    const std::string name =
        std::to_string(t.major) + std::to_string(t.minor) + (t.variant ? std::string(1, t.variant) : "");
    cubins << (n_cubins++ ? ", " : "") << "sm_" << name;
    if (t.ptx) {
      ptx << (n_ptx++ ? ", " : "") << "compute_" << name << " (JIT for " << t.major << "." << t.minor
          << (t.variant == 0 ? " and newer)" : t.variant == 'a' ? " only)" : " family)");
    }
  }
  if (n_cubins == 0) return "no CUDA architectures";
  std::string out = "cubins for " + cubins.str();
  if (n_ptx) out += "; PTX for " + ptx.str();
  return out;
}

}  // namespace cuda_arch
}  // namespace fusedtrain
